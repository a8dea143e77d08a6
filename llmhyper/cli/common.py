"""What every command shares: the data arguments, checked number types, and turning arguments into
typed settings. Nothing below the cli layer sees an argparse Namespace."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from llmhyper.data import DATASETS, DataSettings


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a whole number") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def finite_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return value


def non_negative_float(text: str) -> float:
    value = finite_float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
    return value


def add_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", default="movielens-100k", choices=DATASETS, help="a named data set")
    p.add_argument("--data", help="a folder with your own ads/features/users/impressions tables (overrides --dataset)")
    p.add_argument("--posters", help="poster folder for MovieLens (default: ../shared/data/ml100k-posters if present)")
    p.add_argument("--seed", type=non_negative_int, default=0, help="seed of the user split and of every sample")
    p.add_argument("--k", type=positive_int, default=3, help="neighbours retrieved per cold ad")
    p.add_argument("--encoder", default="minilm-effnet-conse", help="minilm-effnet-conse | open_clip:ARCH:CKPT")


def data_settings(args: argparse.Namespace) -> DataSettings:
    folder = Path(args.data).expanduser().resolve() if getattr(args, "data", None) else None
    return DataSettings(dataset=args.dataset, folder=folder, posters=args.posters, seed=args.seed)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows every default in --help."""

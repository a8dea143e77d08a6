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


def non_empty(text: str) -> str:
    """A path or name that must not be blank (an empty --data would otherwise mean 'no folder')."""
    if not text.strip():
        raise argparse.ArgumentTypeError("must not be empty")
    return text


def id_list(text: str) -> list[str]:
    """Comma-separated ids, e.g. `--ads 12,40`: at least one, none blank, no repeats."""
    ids = [t.strip() for t in text.split(",")]
    if not text.strip() or any(not t for t in ids):
        raise argparse.ArgumentTypeError(f"expected comma-separated ids without blanks, got '{text}'")
    if len(set(ids)) != len(ids):
        dup = next(t for t in ids if ids.count(t) > 1)
        raise argparse.ArgumentTypeError(f"id '{dup}' is given twice")
    return ids


def add_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", default="movielens-100k", choices=DATASETS, help="a named data set")
    p.add_argument(
        "--data",
        type=non_empty,
        help="a folder with your own ads/features/users/impressions tables (overrides --dataset)",
    )
    p.add_argument(
        "--posters",
        type=non_empty,
        help="poster folder for MovieLens (default: ../shared/data/ml100k-posters if present)",
    )
    p.add_argument(
        "--seed", type=non_negative_int, default=0, help="seed of the user split and of every sample"
    )
    p.add_argument("--k", type=positive_int, default=3, help="neighbours retrieved per cold ad")
    p.add_argument(
        "--encoder",
        type=non_empty,
        default="minilm-effnet-conse",
        help="minilm-effnet-conse | open_clip:ARCH:CKPT",
    )


def data_settings(args: argparse.Namespace) -> DataSettings:
    folder = Path(args.data).expanduser().resolve() if getattr(args, "data", None) is not None else None
    return DataSettings(dataset=args.dataset, folder=folder, posters=args.posters, seed=args.seed)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows every default in --help."""


class StrictParser(argparse.ArgumentParser):
    """A sub-command's parser: an unknown argument is reported with the sub-command's own usage (argparse
    leaves it to the top-level parser, whose usage does not show the sub-command's options)."""

    def parse_known_args(self, args=None, namespace=None):
        namespace, extras = super().parse_known_args(args, namespace)
        if extras:
            self.error(f"unrecognized arguments: {' '.join(extras)}")
        return namespace, extras

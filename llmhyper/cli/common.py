"""What every command shares: the data arguments, checked number types, and turning arguments into
typed settings. Nothing below the cli layer sees an argparse Namespace."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from llmhyper.data import DATASETS, DataSettings


def number(kind: type, *, low: float | None = None, high: float | None = None, strict_low: bool = False):
    """An argparse type: a finite `kind` (int or float) within [low, high] (above low when `strict_low`),
    with a one-line message naming what was expected."""
    what = "a whole number" if kind is int else "a number"

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"'{text}' is not {what}") from None
        if kind is float and not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
        too_low = low is not None and (value <= low if strict_low else value < low)
        if too_low or (high is not None and value > high):
            if strict_low:
                bound = f"above {low:g}"
            elif high is not None:
                bound = f"{low:g}-{high:g}"
            else:
                bound = "0 or more" if low == 0 else f"at least {low:g}"
            raise argparse.ArgumentTypeError(f"must be {bound}, got {text}")
        return value

    parse.__name__ = f"{kind.__name__}_{low}_{high}"  # argparse names the type in its messages
    return parse


positive_int = number(int, low=1)
non_negative_int = number(int, low=0)
finite_float = number(float)
non_negative_float = number(float, low=0)
positive_float = number(float, low=0, strict_low=True)
port_number = number(int, low=1, high=65535)


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


def add_ranking_args(p: argparse.ArgumentParser) -> None:
    """How serve and score rank: the judge-flag threshold and the catalogue (shared, so they rank alike)."""
    p.add_argument(
        "--flag-threshold",
        type=positive_float,
        default=1.0,
        help="drop a judge-flagged ad for users with |standardised flagged feature| >= this",
    )
    p.add_argument(
        "--catalog",
        choices=["generated", "union"],
        default="generated",
        help="rank the generated ads, or also ads only the trained artifact has",
    )


def data_settings(args: argparse.Namespace) -> DataSettings:
    folder = Path(args.data).expanduser().resolve() if getattr(args, "data", None) is not None else None
    return DataSettings(dataset=args.dataset, folder=folder, posters=args.posters, seed=args.seed)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows every default in --help, except where the help already says what the default is (argparse
    would add a second, misleading "(default: None)")."""

    def _get_help_string(self, action):
        if "(default:" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


class StrictParser(argparse.ArgumentParser):
    """A sub-command's parser: an unknown argument is reported with the sub-command's own usage (argparse
    leaves it to the top-level parser, whose usage does not show the sub-command's options)."""

    def parse_known_args(self, args=None, namespace=None):
        namespace, extras = super().parse_known_args(args, namespace)
        if extras:
            self.error(f"unrecognized arguments: {' '.join(extras)}")
        return namespace, extras

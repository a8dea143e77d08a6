"""`llmhyper evaluate`: every baseline and the given weight artifacts on the cold ads, with intervals."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from llmhyper.cli.common import add_data_args, data_settings, non_negative_int
from llmhyper.ctr.evaluate import baseline_methods, evaluate, load_artifacts, markdown_table
from llmhyper.ctr.prepare import prepare
from llmhyper.data import load_dataset
from llmhyper.errors import LLMHyperError
from llmhyper.retrieval.encoders import get_encoder
from llmhyper.store import write_json_atomic
from llmhyper.weights import WeightTable


def add_parser(sub) -> None:
    p = sub.add_parser("evaluate", help="score baselines and weight artifacts on the cold ads",
                       description="Score every baseline and the given weight artifacts on the cold ads, with "
                                   "paired bootstrap intervals over users.")
    add_data_args(p)
    p.add_argument("--weights", action="append", help="a weight artifact folder (repeatable)")
    p.add_argument("--json", help="also write the results as JSON here")
    p.add_argument("--bootstrap", type=non_negative_int, default=1000, help="bootstrap resamples (0: no intervals)")
    p.add_argument("--save", help="also save every baseline's weights (and the retired pool) under this folder")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    for target in (args.json, args.save):
        _check_writable(target)
    t0 = time.time()
    artifacts = load_artifacts(args.weights or [])  # damaged artifacts fail before any work
    data = load_dataset(data_settings(args))
    encoder = get_encoder(args.encoder)
    prep = prepare(data, encoder=encoder, k=args.k, seed=args.seed)
    methods = baseline_methods(prep, encoder, seed=args.seed)
    ad_ids = list(data.cold_ads)
    for name, table in artifacts.items():
        if name in methods:
            raise LLMHyperError(f"the weight artifact '{name}' has the name of a baseline; rename its folder")
        covered = set(table.ad_ids)
        ad_ids = [a for a in ad_ids if a in covered]
        methods[name] = table
    if not ad_ids:
        raise LLMHyperError("the weight artifacts cover none of the cold ads of this data set")
    result = evaluate(prep, methods, ad_ids=ad_ids, n_boot=args.bootstrap, seed=args.seed,
                      challengers=list(artifacts))
    if args.save:  # every linear method's weights (and the retired pool) as npz + JSON artifacts
        for name, m in {"retired": prep.retired, **methods}.items():
            if isinstance(m, WeightTable) and name not in artifacts:
                m.save(Path(args.save) / name)
    result["wall_seconds"] = round(time.time() - t0, 1)
    print(markdown_table(result))
    print(f"\n(wall time {result['wall_seconds']} s)")
    if args.json:
        write_json_atomic(args.json, result)
    return 0


def _check_writable(target: str | None) -> None:
    """An output path under an existing file fails now, not after the whole evaluation."""
    if not target:
        return
    for parent in Path(target).resolve().parents:
        if parent.exists():
            if not parent.is_dir():
                raise LLMHyperError(f"cannot write {target}: {parent} is a file")
            return

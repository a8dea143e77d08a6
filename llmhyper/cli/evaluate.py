"""`llmhyper evaluate`: every baseline and the given weight artifacts on the cold ads, with intervals."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from llmhyper.cli.common import add_data_args, data_settings, non_empty, non_negative_int
from llmhyper.ctr.evaluate import baseline_methods, evaluable_ads, evaluate, load_artifacts, markdown_table
from llmhyper.ctr.prepare import prepare
from llmhyper.data import load_dataset
from llmhyper.data.scaling import stamp_scaling
from llmhyper.errors import LLMHyperError
from llmhyper.llm.lm_encoder import LMTextEncoder
from llmhyper.retrieval.encoders import get_encoder
from llmhyper.store import write_json_atomic
from llmhyper.weights import WeightTable

# rows evaluate makes itself (and the pool --save writes): an artifact by one of these names is refused up
# front, and again against the actual baselines below
BASELINE_NAMES = (
    "lr_warm",
    "lr_cold",
    "knn",
    "knn_cal",
    "ridge",
    "ridge_cal",
    "popularity",
    "random",
    "embsim",
    "retired",
    "truth",
)


def add_parser(sub) -> None:
    p = sub.add_parser(
        "evaluate",
        help="score baselines and weight artifacts on the cold ads",
        description="Score every baseline and the given weight artifacts on the cold ads, with "
        "paired bootstrap intervals over users.",
    )
    add_data_args(p)
    p.add_argument("--weights", action="append", type=non_empty, help="a weight artifact folder (repeatable)")
    p.add_argument("--json", type=non_empty, help="also write the results as JSON here")
    p.add_argument(
        "--bootstrap", type=non_negative_int, default=1000, help="bootstrap resamples (0: no intervals)"
    )
    p.add_argument(
        "--save",
        type=non_empty,
        help="also save every baseline's weights (and the retired pool) under this folder",
    )
    p.add_argument(
        "--prior-lm-vectors",
        action="store_true",
        help="also offer the ridge prior the embedded LM's own embedding of each ad (its mean hidden state; "
        "~1 s per ad once on 2 cores, then cached); kept only if cross-validation on retired ads picks it",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    _check_writable(args.json, folder=False)
    _check_writable(args.save, folder=True)
    t0 = time.time()
    artifacts = load_artifacts(args.weights or [], reserved=BASELINE_NAMES)  # damage fails before any work
    data = load_dataset(data_settings(args))
    for name, table in artifacts.items():  # before any model is trained
        missing = [f for f in data.feature_names if f not in set(table.feature_names)]
        if missing:
            raise LLMHyperError(
                f"the weight artifact '{name}' lacks {len(missing)} features of {data.name} "
                f"(first: {missing[:3]}); was it made on other data?"
            )
    encoder = get_encoder(args.encoder)
    prep = prepare(data, encoder=encoder, k=args.k, seed=args.seed)
    if args.prior_lm_vectors:
        with LMTextEncoder() as lm_encoder:
            methods = baseline_methods(prep, encoder, seed=args.seed, prior_extra={"lm": lm_encoder})
    else:
        methods = baseline_methods(prep, encoder, seed=args.seed)
    clash = [name for name in artifacts if name in methods]
    if clash:
        raise LLMHyperError(
            f"the weight artifact '{clash[0]}' has the name of a baseline; change 'method' "
            "in its weights.json"
        )
    ad_ids, notes = evaluable_ads(prep)
    for note in notes:
        print(f"llmhyper: {note}", file=sys.stderr)
    for name, table in artifacts.items():
        covered = set(table.ad_ids)
        ad_ids = [a for a in ad_ids if a in covered]
        methods[name] = table
    if not ad_ids:
        raise LLMHyperError("the weight artifacts cover none of the cold ads that can be evaluated here")
    result = evaluate(
        prep, methods, ad_ids=ad_ids, n_boot=args.bootstrap, seed=args.seed, challengers=list(artifacts)
    )
    if args.save:  # every linear method's weights (and the retired pool) as npz + JSON artifacts
        for name, m in {"retired": prep.retired, **methods}.items():
            if isinstance(m, WeightTable) and name not in artifacts:
                stamp_scaling(m, data.scaling).save(Path(args.save) / name)  # servable on raw features
    result["wall_seconds"] = round(time.time() - t0, 1)
    print(markdown_table(result))
    print(f"\n(wall time {result['wall_seconds']} s)")
    if args.json:
        write_json_atomic(args.json, result)
    return 0


def _check_writable(target: str | None, *, folder: bool) -> None:
    """An output path that cannot be written fails now, not after the whole evaluation."""
    if not target:
        return
    path = Path(target).expanduser().resolve()
    if folder and path.exists() and not path.is_dir():
        raise LLMHyperError(f"cannot write into {target}: it is a file, not a folder")
    if not folder and path.is_dir():
        raise LLMHyperError(f"cannot write {target}: it is a folder")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise LLMHyperError(f"cannot write {target}: {parent} is a file")
            return

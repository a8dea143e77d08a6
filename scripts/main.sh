#!/usr/bin/env bash
# The main job on the embedded defaults: set up, generate LLM-HYPER weights for the first N MovieLens-100k
# cold movies with the embedded Qwen2.5-Coder-1.5B, then evaluate them beside every baseline.
#   bash scripts/main.sh            # N=5 (about 10 minutes on 2 CPU cores after set-up)
#   LIMIT=97 bash scripts/main.sh   # the full cold set (hours on CPU; resumable: rerun to continue)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export LITELLM_LOCAL_MODEL_COST_MAP=True
LIMIT=${LIMIT:-5}
OUT=${OUT:-runs/movielens-embedded-zero-shot}
.venv/bin/llmhyper generate --dataset movielens-100k --limit "$LIMIT" --out "$OUT"
.venv/bin/llmhyper evaluate --dataset movielens-100k --weights "$OUT/weights" --json "$OUT/evaluate.json"

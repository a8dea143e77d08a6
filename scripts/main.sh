#!/usr/bin/env bash
# The main job on the embedded defaults: set up, run the compiled edit program (the embedded
# Qwen2.5-Coder-1.5B as a gated editor of the learned ridge prior) on the first N MovieLens-100k cold movies,
# then evaluate them beside every prior and baseline.
#   bash scripts/main.sh            # N=5
#   LIMIT=97 bash scripts/main.sh   # the full cold set (resumable: rerun to continue)
#   POSTERS=/nonexistent OUT=runs/movielens-edit-noposters bash scripts/main.sh   # as without posters
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export LITELLM_LOCAL_MODEL_COST_MAP=True
LIMIT=${LIMIT:-5}
OUT=${OUT:-runs/movielens-edit}
DATA=(--dataset movielens-100k ${POSTERS:+--posters "$POSTERS"})
.venv/bin/llmhyper edit run --program programs/edit_ml100k.json "${DATA[@]}" --limit "$LIMIT" --out "$OUT"
.venv/bin/llmhyper evaluate "${DATA[@]}" --weights "$OUT/weights" --json "$OUT/evaluate.json"

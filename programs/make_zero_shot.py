"""Write programs/zero_shot.json (DSPy state) and its manifest from the signatures in llmhyper.hyper.signatures.

python programs/make_zero_shot.py
"""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

from llmhyper.hyper.program import LLMHyper
from llmhyper.store import file_sha256, git_commit, now, versions, write_json_atomic

HERE = Path(__file__).parent


def main() -> None:
    path = HERE / "zero_shot.json"
    LLMHyper().save(str(path))
    write_json_atomic(
        HERE / "zero_shot.manifest.json",
        {
            "name": "zero_shot",
            "kind": "zero-shot (not compiled)",
            "description": "The paper's prompt (arXiv 2604.12096, appendix G) paraphrased as DSPy signature "
            "instructions; no demonstrations are baked in: the retrieved similar ads are inputs.",
            "predictors": ["predict_weights.predict", "judge"],
            "program_sha256": file_sha256(path),
            "evolution": None,
            "created": now(),
            "git": git_commit(),
            "versions": versions(),
        },
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

"""Lazy imports of optional heavy parts, failing with an install hint (as dspy.utils.lazy_import)."""

from __future__ import annotations

import importlib
from types import ModuleType

from llmhyper.errors import MissingDependency


def require(module: str, extra: str, purpose: str = "") -> ModuleType:
    """Import `module` or raise MissingDependency naming the pip extra that provides it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:  # the module itself, or one of its own imports, is missing
        what = f" for {purpose}" if purpose else ""
        raise MissingDependency(
            f"'{module}' is needed{what} but could not be imported ({exc}). "
            f'Install it with: pip install -e ".[{extra}]" -c constraints-cpu.txt'
        ) from exc

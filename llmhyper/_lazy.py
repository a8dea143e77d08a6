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


def start_ray(purpose: str, *, address: str | None = None, num_cpus: int | None = None, data: bool = False):
    """`ray`, started (or joined at `address`) once per process; a Ray this process already started is
    reused as it is. `data`: Ray Data is needed too. MissingDependency names the `ray` extra."""
    ray = require("ray", "ray", purpose)
    if data:
        require("ray.data", "ray", purpose)
    if not ray.is_initialized():
        kwargs = {"include_dashboard": False, "ignore_reinit_error": True, "log_to_driver": False}
        if address is not None:
            kwargs["address"] = address
        elif num_cpus is not None:
            kwargs["num_cpus"] = num_cpus
        ray.init(**kwargs)
    return ray

"""The package's shape: layers import only downward, argparse lives in cli/ alone, own modules are
imported at the top of a module (never hidden inside a function), and no library module grows past 500
lines. Read from the source with `ast`, so a violation fails here before it tangles anything."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parent.parent / "llmhyper"

# bottom to top; a module may import from lower layers and from its own package only
LAYERS = {
    "errors": 0, "paths": 0, "_lazy": 0, "store": 0, "weights": 0, "runs": 0, "fmt": 0, "__init__": 0,
    "data": 1,
    "retrieval": 2,
    "ctr": 3,
    "llm": 4,
    "hyper": 5,
    "optimize": 6, "trust": 6, "serve": 6,
    "report": 7,
    "cli": 8,
}
MAX_LINES = 500


def unit_of(module: str) -> str:
    """`llmhyper.ctr.metrics` -> `ctr`; `llmhyper.store` -> `store`."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__" and len(parts) > 2:
        parts = parts[:-1]
    return ".".join(parts)


def own_imports(tree: ast.AST, module: str) -> list[tuple[int, str, bool]]:
    """(line, imported llmhyper module, whether the import sits inside a function) for each own import."""
    out = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inside = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                out.extend((child.lineno, a.name, in_function) for a in child.names if a.name.startswith("llmhyper"))
            elif isinstance(child, ast.ImportFrom):
                target = child.module or ""
                if child.level:  # relative import: resolve against this module's package
                    base = module.split(".")[: -child.level] if not module.endswith("__init__") else module.split(".")
                    target = ".".join(base + ([target] if target else []))
                if target.startswith("llmhyper"):
                    if target == "llmhyper":
                        out.extend((child.lineno, f"llmhyper.{a.name}", in_function) for a in child.names)
                    else:
                        out.append((child.lineno, target, in_function))
            visit(child, inside)

    visit(tree, False)
    return out


def library_files() -> list[Path]:
    return sorted(p for p in PKG.rglob("*.py") if "__pycache__" not in p.parts)


def violations() -> dict[str, list[str]]:
    found: dict[str, list[str]] = {"upward": [], "argparse": [], "in_function": [], "unknown": [], "long": []}
    for path in library_files():
        module = module_name(path)
        unit = unit_of(module)
        src = path.read_text()
        tree = ast.parse(src)
        where = f"{path.relative_to(PKG.parent)}"
        if unit not in LAYERS:
            found["unknown"].append(f"{where}: '{unit}' has no layer in tests/test_architecture.py")
            continue
        for line, target, in_function in own_imports(tree, module):
            other = unit_of(target)
            if other not in LAYERS:
                found["unknown"].append(f"{where}:{line} imports {target}, which has no layer")
                continue
            same_package = other == unit and LAYERS[unit] > 0
            if in_function:
                found["in_function"].append(f"{where}:{line} imports {target} inside a function")
            if not same_package and LAYERS[other] >= LAYERS[unit] and not (LAYERS[unit] == 0 == LAYERS[other]):
                found["upward"].append(f"{where}:{line} ({unit}, layer {LAYERS[unit]}) imports {target} "
                                       f"({other}, layer {LAYERS[other]})")
        if unit != "cli":
            for node in ast.walk(tree):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                    [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
                if any(n == "argparse" or n.startswith("argparse.") for n in names):
                    found["argparse"].append(f"{where}:{node.lineno} imports argparse outside cli/")
        n_lines = src.count("\n")
        if n_lines > MAX_LINES:
            found["long"].append(f"{where}: {n_lines} lines (at most {MAX_LINES})")
    return found


@pytest.mark.parametrize("kind", ["upward", "argparse", "in_function", "unknown", "long"])
def test_package_shape(kind):
    bad = violations()[kind]
    assert not bad, "\n".join(bad)


def test_foundation_modules_import_nothing_above_them():
    # a hand-made module tree the checker must flag: it proves the checker itself can fail
    tree = ast.parse("from llmhyper.ctr import metrics\n\ndef f():\n    from llmhyper import store\n")
    imports = own_imports(tree, "llmhyper.data.contract")
    assert (1, "llmhyper.ctr", False) in imports
    assert (4, "llmhyper.store", True) in imports
    assert unit_of("llmhyper.ctr.metrics") == "ctr" and LAYERS["ctr"] > LAYERS["data"]


def test_one_formatter_for_the_whole_package():
    """`ruff format` (line length 110, pyproject.toml) leaves the package as it is."""
    import shutil
    import subprocess
    import sys

    ruff = shutil.which("ruff") or str(Path(sys.executable).parent / "ruff")
    if not Path(ruff).exists():
        pytest.skip("ruff is not installed (it comes with the [test] extra)")
    out = subprocess.run([ruff, "format", "--check", str(PKG)], capture_output=True, text=True)
    assert out.returncode == 0, f"run `ruff format llmhyper`:\n{out.stdout}{out.stderr}"

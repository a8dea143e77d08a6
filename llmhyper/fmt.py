"""Plain-text formatting shared by every report: markdown tables and interval cells."""

from __future__ import annotations

from typing import Any


def md_table(head: list[str], rows: list[list[Any]]) -> str:
    esc = lambda s: str(s).replace("|", "\\|").replace("\n", " ")  # noqa: E731
    lines = ["| " + " | ".join(map(esc, head)) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(map(esc, r)) + " |" for r in rows]
    return "\n".join(lines)


def ci_cell(c: dict[str, Any] | None, digits: int = 3) -> str:
    """`{"value", "lo", "hi"}` as `0.577 [0.540, 0.608]`; a missing value as a dash."""
    if not c or c.get("value") is None:
        return "—"
    cell = f"{c['value']:.{digits}f}"
    if c.get("lo") is not None and c.get("hi") is not None:
        cell += f" [{c['lo']:.{digits}f}, {c['hi']:.{digits}f}]"
    return cell


def diff_cell(d: dict[str, Any] | None, digits: int = 3) -> str:
    """A paired difference `{"diff", "lo", "hi", "p_value"}` as `+0.025 [+0.010, +0.042] (p=0.001)`."""
    if not d or d.get("diff") is None:
        return "—"
    cell = f"{d['diff']:+.{digits}f}"
    if d.get("lo") is not None:
        cell += f" [{d['lo']:+.{digits}f}, {d['hi']:+.{digits}f}]"
    if d.get("p_value") is not None:
        cell += f" (p={d['p_value']:.3f})"
    return cell

"""Plain-text tables for the terminal: one per scenario, then its targets and notes."""

from __future__ import annotations

from typing import Any

from benchmarks.scenario import Result


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"
    if isinstance(value, (list, tuple)):
        return ",".join(_cell(v) for v in value)
    return str(value)


def table(rows: list[dict[str, Any]]) -> str:
    columns: list[str] = []
    for row in rows:
        columns += [c for c in row if c not in columns]
    cells = [[_cell(row.get(c)) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) for r in cells]
    return "\n".join(lines)


def format_result(result: Result) -> str:
    head = f"[{result.name}] {result.title} ({result.status}, {result.seconds:.0f}s)"
    if result.status != "ok":
        return f"{head}\n  {result.reason}" + ("\n" + result.notes[-1] if result.status == "failed" else "")
    parts = [head]
    if result.rows:
        parts.append(table(result.rows))
    for target in result.targets:
        verdict = {True: "met", False: "NOT met", None: "n/a"}[target.met]
        parts.append(f"target {target.metric} {target.goal}: {_cell(target.value)} ({verdict})")
    parts += [f"note: {note}" for note in result.notes]
    return "\n".join(parts)

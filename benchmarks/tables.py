"""BENCHMARKS.md's generated tables, from the JSON results committed in ``benchmarks/results/``.

``python -m benchmarks.tables`` rewrites every block between
``<!-- generated: NAME -->`` and ``<!-- end generated -->`` in BENCHMARKS.md from
``benchmarks/results/NAME.json`` (a scenario's JSON as ``scripts/bench`` writes it, and
the run's ``summary.json`` machine line when saved beside it as ``NAME.machine.txt``);
``--check`` only says whether the file is up to date (exit 1 if not). Figures are never
copied by hand.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
DOC = ROOT / "BENCHMARKS.md"
BLOCK = re.compile(r"(<!-- generated: (?P<name>[a-z_]+) -->\n)(?P<body>.*?)(<!-- end generated -->)", re.S)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"
    return str(value)


def render(result: dict[str, Any], machine: str | None) -> str:
    """One scenario's rows as a Markdown table, then its targets (met or not) and notes."""
    columns: list[str] = []
    for row in result["rows"]:
        columns += [c for c in row if c not in columns]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(row.get(c)) for c in columns) + " |" for row in result["rows"]]
    lines.append("")
    for target in result["targets"]:
        verdict = {True: "**met**", False: "**not met**", None: "n/a"}[target["met"]]
        lines.append(f"- target `{target['metric']}` {target['goal']}: {_cell(target['value'])} ({verdict})")
    lines += [f"- {note}" for note in result["notes"]]
    lines.append(f"- from `benchmarks/results/{result['name']}.json`; parameters: `{json.dumps(result['params'])}`")
    if machine:
        lines.append(f"- machine line: `{machine}`")
    return "\n".join(lines) + "\n"


def generated(text: str) -> str:
    def block(match: re.Match[str]) -> str:
        name = match["name"]
        result = json.loads((RESULTS / f"{name}.json").read_text())
        machine_file = RESULTS / f"{name}.machine.txt"
        machine = machine_file.read_text().strip() if machine_file.exists() else None
        return match.group(1) + render(result, machine) + match.group(4)

    return BLOCK.sub(block, text)


def main(argv: list[str]) -> int:
    text = DOC.read_text()
    new = generated(text)
    if "--check" in argv:
        if new != text:
            print("BENCHMARKS.md is out of date with benchmarks/results/: run python -m benchmarks.tables")
            return 1
        return 0
    DOC.write_text(new)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

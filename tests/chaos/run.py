"""``scripts/chaos``: every chaos scenario at full size (or ``--size medium``/``ci``), each on
a Redis of its own, the figures written to a JSON file and rendered into RELIABILITY.md."""

from __future__ import annotations

import dataclasses
import datetime
import json
import shlex
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import click

from benchmarks.harness import LocalRedis, machine
from tests.chaos import scenarios
from tests.chaos.report import render
from tests.chaos.rig import Rig
from tests.conftest import ROOT

#: Scenario → size → parameters. ``ci`` is what tests/chaos/test_chaos.py runs.
SIZES: dict[str, dict[str, dict[str, Any]]] = {
    "kills": {"full": {"tasks": 2000, "kills": 10, "seconds": (0.05, 0.4)},
              "medium": {"tasks": 600, "kills": 6, "seconds": (0.05, 0.4)},
              "ci": {"tasks": 120, "kills": 2, "seed": 11}},
    "redis_restarts": {"full": {"tasks": 300, "restarts": 2}, "medium": {"tasks": 150, "restarts": 2},
                       "ci": {"tasks": 40, "restarts": 2}},
    "connection_drops": {"full": {"tasks": 20, "drops": 10}, "medium": {"tasks": 10, "drops": 5},
                         "ci": {"tasks": 4, "drops": 2}},
    "stalls_above": {"full": {"rounds": 2, "dead_after_s": 18, "stall_s": 10},
                     "medium": {"rounds": 1, "dead_after_s": 18, "stall_s": 10}, "ci": None},
    "stalls_below": {"full": {"rounds": 2, "dead_after_s": 8, "stall_s": 14},
                     "medium": {"rounds": 1, "dead_after_s": 8, "stall_s": 14}, "ci": None},
    "long_task": {"full": {"seconds": 15.0}, "medium": {"seconds": 15.0}, "ci": {"seconds": 15.0}},
    "poison": {"full": {"each": 5, "neighbours": 50}, "medium": {"each": 3, "neighbours": 20},
               "ci": {"each": 1, "neighbours": 6}},
}


def _commit() -> str:
    """The commit of this checkout, marked ``+changes`` when the tree differs from it (the
    files this run writes aside)."""
    git = ["git", "-C", str(ROOT)]
    head = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run([*git, "status", "--porcelain", "--untracked-files=no", "--", ".",
                            ":!RELIABILITY.md", ":!tests/chaos/results.json"],  # what this run writes
                           capture_output=True, text=True)
    return (head or "?") + ("+changes" if dirty.stdout.strip() else "")


def run_one(name: str, params: dict[str, Any], workdir: Path) -> dict[str, Any]:
    started = time.monotonic()
    try:
        if name == "redis_restarts":
            figures = scenarios.redis_restarts(workdir / "redis", workdir / "logs", **params)
        else:
            function = scenarios.stalls if name.startswith("stalls") else getattr(scenarios, name)
            with LocalRedis() as server, Rig(server.url, workdir / "logs") as rig:
                figures = function(rig, **params)
        status = "ok"
    except Exception as exc:  # one broken scenario must not hide the others' figures
        figures, status = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}, "failed"
    return {"status": status, "params": params, "figures": figures, "seconds": round(time.monotonic() - started),
            "commit": _commit(), "command": "scripts/chaos " + shlex.join(sys.argv[1:]),
            "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}


@click.command()
@click.option("--size", type=click.Choice(["full", "medium", "ci"]), default="full", show_default=True)
@click.option("--only", default=None, help=f"Comma-separated scenarios: {', '.join(SIZES)}.")
@click.option("--out", type=click.Path(path_type=Path), default=Path("tests/chaos/results.json"), show_default=True,
              help="The JSON figures (committed: RELIABILITY.md is rendered from it).")
@click.option("--report", type=click.Path(path_type=Path), default=Path("RELIABILITY.md"), show_default=True)
@click.option("--render-only", is_flag=True, help="Write the report from --out without running anything.")
def chaos(size: str, only: str | None, out: Path, report: Path, render_only: bool) -> None:
    """Run the chaos scenarios, write their figures to --out and RELIABILITY.md."""
    if not render_only:
        names = [n for n in SIZES if SIZES[n][size] is not None and (not only or n in only.split(","))]
        host = dataclasses.replace(machine(), commit=_commit())
        click.echo(f"machine: {host.line()}")
        results: dict[str, Any] = {
            "command": "scripts/chaos " + shlex.join(sys.argv[1:]), "size": size,
            "machine": dataclasses.asdict(host), "machine_line": host.line(), "scenarios": {},
        }
        if only and out.exists():  # a rerun of some scenarios keeps the others' figures
            kept = json.loads(out.read_text())
            results["scenarios"] = {**kept["scenarios"]}
            results.update(command=kept["command"], size=kept["size"], machine=kept["machine"],
                           machine_line=kept["machine_line"])
        for name in names:
            click.echo(f"== {name} {json.dumps(SIZES[name][size])}", err=True)
            with tempfile.TemporaryDirectory(prefix=f"chaos-{name}-") as workdir:
                results["scenarios"][name] = run_one(name, SIZES[name][size], Path(workdir))
            shown = {k: v for k, v in results["scenarios"][name]["figures"].items() if k not in ("faults", "traceback")}
            click.echo(f"   {results['scenarios'][name]['status']} in {results['scenarios'][name]['seconds']}s: "
                       f"{json.dumps(shown, default=str)}")
        out.write_text(json.dumps(results, indent=2, default=str) + "\n")
    report.write_text(render(json.loads(out.read_text())))
    click.echo(f"figures: {out}; report: {report}")


if __name__ == "__main__":
    chaos(prog_name="scripts/chaos")

"""``taskmesh bench`` / ``scripts/bench``: run the scenarios, print a table per
scenario, write one JSON file per scenario and a ``summary.json``.

``--smoke`` runs every scenario at a toy size for CI: it checks the harness works end
to end and asserts nothing about speed. The exit status is non-zero only when a
scenario could not run.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import time
import traceback
from pathlib import Path
from typing import Any

import click

from benchmarks import SCENARIOS
from benchmarks.harness import machine
from benchmarks.report import format_result
from benchmarks.scenario import Context, Result


def parse_override(text: str) -> tuple[str, str, Any]:
    """``scenario.param=value``; the value is JSON when it parses as JSON, else a string."""
    key, sep, raw = text.partition("=")
    scenario, dot, param = key.partition(".")
    if not sep or not dot or scenario not in SCENARIOS:
        raise click.BadParameter(f"{text!r}: write it as SCENARIO.PARAM=VALUE, SCENARIO one of {', '.join(SCENARIOS)}",
                                 param_hint="--set")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return scenario, param, value


def run_scenario(name: str, params: dict[str, Any], ctx: Context) -> Result:
    module = importlib.import_module(SCENARIOS[name])
    started = time.monotonic()
    try:
        result = module.run(params, ctx)
    except Exception as exc:  # one broken scenario must not hide the others' figures
        result = Result(name, module.TITLE, status="failed", reason=f"{type(exc).__name__}: {exc}", params=params)
        result.notes.append(traceback.format_exc())
    result.seconds = round(time.monotonic() - started, 1)
    return result


@click.command()
@click.option("--smoke", is_flag=True, help="Every scenario at a toy size (for CI; asserts nothing about speed).")
@click.option("--only", default=None, help=f"Comma-separated scenarios to run: {', '.join(SCENARIOS)}.")
@click.option("--out", type=click.Path(path_type=Path), default=Path("bench-results"), show_default=True,
              help="Directory for the JSON results and worker logs.")
@click.option("--set", "overrides", multiple=True, metavar="SCENARIO.PARAM=VALUE",
              help="Override a scenario parameter (JSON value), e.g. --set mixed.cpu_tasks=96.")
@click.option("--list", "list_only", is_flag=True, help="Print each scenario's parameters and exit.")
def bench(smoke: bool, only: str | None, out: Path, overrides: tuple[str, ...], list_only: bool) -> None:
    """Run the benchmarks (see BENCHMARKS.md) and write JSON results to --out."""
    names = list(SCENARIOS) if not only else [n.strip() for n in only.split(",") if n.strip()]
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        raise click.BadParameter(f"unknown scenario(s) {unknown}; choose from {', '.join(SCENARIOS)}",
                                 param_hint="--only")
    params = {name: dict(getattr(importlib.import_module(SCENARIOS[name]), "SMOKE" if smoke else "FULL"))
              for name in names}
    for scenario, param, value in map(parse_override, overrides):
        if scenario in params:
            if param not in params[scenario]:
                raise click.BadParameter(f"{scenario} has no parameter {param!r}; it has {sorted(params[scenario])}",
                                         param_hint="--set")
            params[scenario][param] = value
    if list_only:
        for name in names:
            click.echo(f"{name}: {json.dumps(params[name])}")
        return
    out.mkdir(parents=True, exist_ok=True)
    ctx = Context(out=out, smoke=smoke)
    host = machine()
    click.echo(f"machine: {host.line()}")
    click.echo("mode: smoke (toy sizes; figures mean nothing)" if smoke else "mode: full")
    for name in names:
        click.echo(f"\n== {name} ...", err=True)
        result = run_scenario(name, params[name], ctx)
        ctx.results[name] = result
        (out / f"{name}.json").write_text(json.dumps(result.to_json(), indent=2, default=str))
        click.echo(format_result(result))
    summary = {
        "machine": dataclasses.asdict(host), "machine_line": host.line(), "smoke": smoke,
        "scenarios": {name: result.to_json() for name, result in ctx.results.items()},
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    click.echo(f"\nresults: {out / 'summary.json'}")
    failed = [name for name, result in ctx.results.items() if result.status == "failed"]
    if failed:
        raise click.ClickException(f"scenario(s) failed: {', '.join(failed)}; see {out}/<name>.json")

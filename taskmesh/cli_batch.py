"""``taskmesh batch status|cancel ID``: a batch job submitted with ``submit_batch``."""

from __future__ import annotations

import json
from typing import Any

import click

from taskmesh.app.batch_jobs import batch_status, cancel_batch
from taskmesh.app.loading import app_path, load_app


def _app(ctx: click.Context) -> Any:
    path = app_path(ctx)
    if not path:
        raise click.UsageError("batch needs the app: taskmesh -A myapp.tasks batch status ID")
    return load_app(path)


def format_status(status: dict[str, Any]) -> str:
    eta = "ETA unknown" if status["eta_s"] is None else f"ETA {status['eta_s']:.0f}s"
    ended = status["done"] + status["failed"] + status["revoked"]
    return (f"batch {status['id']} ({status['task']}): {ended}/{status['total']} ended "
            f"({status['progress']:.0%}): {status['done']} done, {status['failed']} failed, "
            f"{status['revoked']} revoked; {status['running_or_waiting']} running or waiting; {eta}"
            + ("; cancelled" if status["cancelled"] else ""))


@click.group()
def batch() -> None:
    """Batch jobs (submit_batch): progress and cancellation."""


@batch.command()
@click.argument("batch_id")
@click.option("--json", "as_json", is_flag=True, help="Print the status as JSON.")
@click.pass_context
def status(ctx: click.Context, batch_id: str, as_json: bool) -> None:
    """Total, done, failed, revoked, progress and ETA of a batch job."""
    found = batch_status(_app(ctx), batch_id)
    click.echo(json.dumps(found) if as_json else format_status(found))


@batch.command()
@click.argument("batch_id")
@click.pass_context
def cancel(ctx: click.Context, batch_id: str) -> None:
    """Revoke the items of a batch job that have not started (running ones finish)."""
    click.echo(f"revoked {cancel_batch(_app(ctx), batch_id)} item(s) not started")

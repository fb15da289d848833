"""``taskmesh dlq list|requeue|purge``: the tasks that failed for good, and what to do with them."""

from __future__ import annotations

import datetime
import json
from typing import Any

import click

from taskmesh.app.loading import app_path, load_app
from taskmesh.state import dead_letters


def _app(ctx: click.Context) -> Any:
    path = app_path(ctx)
    if not path:
        raise click.UsageError("dlq needs the app: taskmesh -A myapp.tasks dlq list")
    return load_app(path)


def _chosen(ids: tuple[str, ...], every: bool, known: list[dict]) -> list[str]:
    if every == bool(ids):
        raise click.UsageError("name the task ids, or --all (not both)")
    return [e["id"] for e in known] if every else list(ids)


@click.group()
def dlq() -> None:
    """Tasks that failed for good (no retries left, or their worker lost past max_retries)."""


@dlq.command(name="list")
@click.option("--json", "as_json", is_flag=True, help="Print the entries as JSON.")
@click.pass_context
def list_entries(ctx: click.Context, as_json: bool) -> None:
    """One line per dead-lettered task: id, task, when, retries, why."""
    found = dead_letters.entries(_app(ctx).redis())
    if as_json:
        click.echo(json.dumps(found, indent=2))
        return
    if not found:
        click.echo("dead letters: none")
    for entry in found:
        at = datetime.datetime.fromtimestamp(entry["at"]).strftime("%Y-%m-%d %H:%M:%S")
        click.echo(f"{entry['id']}  {entry['task']}  {at}  retries {entry.get('retries', 0)}  {entry['why']}")


@dlq.command()
@click.argument("ids", nargs=-1)
@click.option("--all", "every", is_flag=True, help="Every dead-lettered task.")
@click.pass_context
def requeue(ctx: click.Context, ids: tuple[str, ...], every: bool) -> None:
    """Send tasks again, with their ids, arguments and queue, and drop them from the store."""
    app = _app(ctx)
    client = app.redis()
    chosen = _chosen(ids, every, dead_letters.entries(client))
    sent = dead_letters.requeue(app, client, chosen)
    missing = sorted(set(chosen) - set(sent))
    click.echo(f"requeued {len(sent)}" + (f"; not in the store: {', '.join(missing)}" if missing else ""))


@dlq.command()
@click.argument("ids", nargs=-1)
@click.option("--all", "every", is_flag=True, help="Every dead-lettered task.")
@click.pass_context
def purge(ctx: click.Context, ids: tuple[str, ...], every: bool) -> None:
    """Drop tasks from the store for good."""
    client = _app(ctx).redis()
    click.echo(f"purged {dead_letters.remove(client, _chosen(ids, every, dead_letters.entries(client)))}")

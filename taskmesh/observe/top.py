"""What a person sees of the fleet: ``taskmesh status [--json]`` and the live ``taskmesh top``.

Both draw ``collect_status`` output and nothing else, so the JSON, the table and the
dashboard cannot disagree, and ``render`` can be tested on a recorded console. ``top``
redraws every second in the terminal's alternate screen and quits on ``q`` or Ctrl-C;
a broker that goes away shows as a line in the frame, not a traceback, and top keeps
retrying, since that is exactly when someone is watching.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import select
import signal
import sys
import termios
import time
import tty
from collections.abc import Callable, Iterator
from typing import Any

import click
import redis
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from taskmesh.core.redact import redacted
from taskmesh.core.sizes import format_mib
from taskmesh.observe.status import collect_status

PIPED_WIDTH = 200
STATE_STYLES = {"idle": "cyan", "busy": "green", "paused": "yellow", "unhealthy": "bold red"}


def render(status: dict[str, Any]) -> RenderableType:
    """One frame of the dashboard from ``collect_status`` output."""
    return Group(
        _header(status), _gpus(status), _warm(status), _batches(status), _other_progress(status), _queues(status),
        _groups(status), _alerts(status), _rebalancer(status),
    )


def _header(status: dict[str, Any]) -> RenderableType:
    at = datetime.datetime.fromtimestamp(status["at"]).strftime("%H:%M:%S")
    counters = "  ".join(f"{name} {value}" for name, value in status["counters"].items() if value)
    return Text.assemble(("taskmesh ", "bold"), f"{at}  ", (counters or "no counts yet", "dim"))


def _gpus(status: dict[str, Any]) -> RenderableType:
    if not status["gpus"]:
        return Text("GPUs: no live GPU worker", style="dim")
    table = Table(title="GPUs", title_justify="left")
    for column in ("gpu", "model", "state", "task", "progress", "", "eta", "idle", "done", "reserved/total"):
        table.add_column(column, no_wrap=column in ("progress", ""))
    for gpu in status["gpus"]:
        state = Text(gpu["state"], style=STATE_STYLES.get(gpu["state"], ""))
        if gpu["state"] in ("paused", "unhealthy") and gpu["reasons"]:
            state.append(" " + "; ".join(gpu["reasons"]), style="dim")
        memory = f"{_mib(gpu['memory_reserved_mib'])}/{_mib(gpu['memory_total_mib'])}"
        first = [f"{gpu['node']} #{gpu['index']}", gpu["model"] or "?", state]
        last = [_duration(gpu["idle_s"]), str(gpu["tasks_done"]), memory]
        for i, task in enumerate(gpu["tasks"] or [None]):
            cells = _task_cells(task) if task else ["", "", "", ""]
            table.add_row(*(first if i == 0 else ["", "", ""]), *cells, *(last if i == 0 else ["", "", ""]))
    return table


def warm_line(gpu: dict[str, Any], now: float) -> str:
    """Seed 001's dashboard line: ``GPU 1: [READY] qwen2.5:7b  idle 5m  tasks: 23``."""
    state = gpu.get("model_state") or gpu["state"]
    idle = gpu.get("model_last_used")
    since = f"  idle {_duration(max(0.0, now - idle))}" if state == "ready" and idle else ""
    return (f"GPU {gpu['index']}: [{state.upper()}] {', '.join(gpu.get('models') or ()) or '-'}{since}"
            f"  tasks: {gpu.get('model_tasks') or 0}")


def _warm(status: dict[str, Any]) -> RenderableType:
    lines = [warm_line(g, status["at"]) for g in status["gpus"] if g.get("models") or g.get("model_state") not in
             (None, "idle", "busy")]
    return Text("\n".join(["Warm models"] + lines)) if lines else Group()


def _batches(status: dict[str, Any]) -> RenderableType:
    """Micro-batches per task: how full they run, how long the first item waits for the rest."""
    lines = [f"{task}: {seen['calls']} calls, {seen['mean_size']} items each, fill wait "
             f"{seen['mean_fill_wait_s'] * 1000:.0f} ms, {seen['items_per_s'] or '-'} items/s"
             for task, seen in (status.get("batches") or {}).items()]
    exclusive = ((status.get("mode") or {}).get("exclusive") or {}).get("batch")
    lines += [("Mode: BATCH (exclusive) | " if job["id"] == exclusive else "")
              + f"job {job['id'][:8]} {job['task']}: {job['total'] - job['running_or_waiting']}/{job['total']} ended "
              f"({job['progress']:.0%}), {job['failed']} failed, eta {_duration(job['eta_s'])}"
              + (" (cancelled)" if job["cancelled"] else "")
              for job in status.get("batch_jobs") or ()]
    return Text("\n".join(["Batches"] + lines)) if lines else Group()


def _task_cells(task: dict[str, Any]) -> list[RenderableType]:
    progress = task.get("progress")
    if not progress:
        return [task.get("task") or task["id"], "", "", ""]
    done, total = progress["done"], progress["total"]
    figures = f"{_number(done)}/{_number(total)} {progress['percent']:.0f}%"
    return [task.get("task") or task["id"], ProgressBar(total=total, completed=done, width=20), figures,
            _duration(task.get("eta_s"))]


def _other_progress(status: dict[str, Any]) -> RenderableType:
    on_gpus = {task["id"] for gpu in status["gpus"] for task in gpu["tasks"]}
    rows = [entry for entry in status["progress"] if entry["id"] not in on_gpus]
    if not rows:
        return Group()
    table = Table(title="Other tasks reporting progress", title_justify="left")
    for column in ("worker", "task", "progress", "", "eta"):
        table.add_column(column, no_wrap=column in ("progress", ""))
    for entry in rows:
        table.add_row(entry["worker"] or "?", *_task_cells(entry))
    return table


def _queues(status: dict[str, Any]) -> RenderableType:
    table = Table(title="Queues", title_justify="left")
    for column in ("queue", "waiting", "in flight", "oldest", "consumers"):
        table.add_column(column, justify="left" if column == "queue" else "right")
    for queue in status["queues"]:
        starving = queue["waiting"] and not queue["consumers"]
        consumers = Text(str(queue["consumers"]), style="bold red" if starving else "")
        table.add_row(queue["name"], str(queue["waiting"]), str(queue["in_flight"]),
                      _duration(queue["oldest_age_s"]), consumers)
    return table


def _groups(status: dict[str, Any]) -> RenderableType:
    if not status["groups"]:
        return Text("Worker groups: no worker has registered", style="dim")
    table = Table(title="Worker groups", title_justify="left")
    for column in ("group", "alive", "paused", "running", "held", "desired", "queues"):
        table.add_column(column)
    for group in status["groups"]:
        alive = Text(f"{group['alive']}/{group['workers']}", style="" if group["alive"] else "bold red")
        desired = "" if group["desired"] is None else str(group["desired"])
        table.add_row(group["group"], alive, str(group["paused"]), str(group["running"]), str(group["held"]),
                      desired, ", ".join(group["queues"]))
    return table


def _alerts(status: dict[str, Any]) -> RenderableType:
    if not status["alerts"]:
        return Text("Alerts: none active", style="dim")
    table = Table(title="Alerts", title_justify="left", title_style="bold red")
    for column in ("alert", "kind", "queue", "since", "message"):
        table.add_column(column)
    for alert in status["alerts"]:
        since = _duration(status["at"] - alert["since"]) if isinstance(alert["since"], int | float) else ""
        table.add_row(alert["name"], alert["kind"] or "", alert["queue"] or "", since, alert["message"] or "")
    return table


def _rebalancer(status: dict[str, Any]) -> RenderableType:
    rebalance = status["rebalance"]
    if not rebalance["runs"]:
        return Text("Rebalancer: no run recorded", style="dim")
    lines = [Text("Rebalancer", style="bold")]
    last = rebalance["runs"][0]
    outcome = "acted" if last.get("acted") else f"no action ({last.get('skipped') or 'nothing to do'})"
    lines.append(Text(f"  last run {_ago(status, last)}: {outcome}"))
    action = rebalance["last_action"]
    if action is not None:
        lines.append(Text(f"  last action {_ago(status, action)}:"))
        for decision in action.get("decisions") or ():
            lines.append(Text(f"    {decision.get('action')} {decision.get('target')}: {decision.get('why')}"))
    if rebalance["hints"]:
        hints = ", ".join(f"{group} → {replicas}" for group, replicas in sorted(rebalance["hints"].items()))
        lines.append(Text(f"  scaling hints: {hints}"))
    return Group(*lines)


def _ago(status: dict[str, Any], run: dict[str, Any]) -> str:
    at = run.get("at")
    return f"{_duration(status['at'] - at)} ago" if isinstance(at, int | float) else "at an unknown time"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(max(0, seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def _mib(value: Any) -> str:
    return format_mib(value) if isinstance(value, int | float) else "?"


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:.1f}"


# --- commands -------------------------------------------------------------------------


def _status_app(ctx: click.Context) -> Any:
    """The ``-A`` app, or taskmesh's defaults (broker from TASKMESH_BROKER_URL) without one."""
    from taskmesh.app.celery_app import create_app
    from taskmesh.app.loading import app_path, load_app

    path = app_path(ctx)
    app = load_app(path) if path else create_app("taskmesh")
    if not hasattr(app, "redis"):
        raise click.UsageError(f"{path} is a plain Celery app; status needs one made with taskmesh.create_app")
    return app


def _collect(app: Any) -> dict[str, Any]:
    try:
        return collect_status(app)
    except redis.RedisError as exc:
        url = redacted(app.conf.broker_url)
        raise click.ClickException(
            f"cannot read the broker at {url} ({str(exc).rstrip('.')}); start it (taskmesh up) or set "
            "TASKMESH_BROKER_URL"
        ) from None


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print the status as JSON.")
@click.pass_context
def status(ctx: click.Context, as_json: bool) -> None:
    """Print queues, workers, GPUs, task progress, alerts and the rebalancer's last runs."""
    data = _collect(_status_app(ctx))
    if as_json:
        click.echo(json.dumps(data, indent=2))
    else:
        # Piped, rich would cut every line at 80 columns; a file or a pager wants whole lines.
        Console(width=None if sys.stdout.isatty() else PIPED_WIDTH).print(render(data))


@click.command()
@click.option("--once", is_flag=True, help="Print one frame and exit.")
@click.option("--interval", type=click.FloatRange(min=0.1), default=1.0, show_default=True,
              help="Seconds between frames.")
@click.pass_context
def top(ctx: click.Context, once: bool, interval: float) -> None:
    """Live dashboard of GPUs, queues, worker groups, alerts and the rebalancer (q or Ctrl-C quits)."""
    app = _status_app(ctx)
    console = Console()
    if once:
        console.print(render(_collect(app)))
        return
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        # Started as a background job (a shell's ``cmd &`` ignores SIGINT) and brought to
        # the foreground later, top would never quit on Ctrl-C: the one key a user tries.
        signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with _keys() as next_key, Live(console=console, screen=True, auto_refresh=False) as live:
            while True:
                live.update(_frame(app), refresh=True)
                if next_key(interval) in ("q", "Q"):
                    break
    except KeyboardInterrupt:
        pass


def _frame(app: Any) -> RenderableType:
    try:
        return render(collect_status(app))
    except redis.RedisError as exc:
        url = redacted(app.conf.broker_url)
        return Text(f"cannot read the broker at {url} ({str(exc).rstrip('.')}); retrying (q quits)", style="bold red")


@contextlib.contextmanager
def _keys() -> Iterator[Callable[[float], str | None]]:
    """``next_key(timeout)``: the key pressed within *timeout* seconds, or None.

    The terminal goes to cbreak mode (keys without Enter; Ctrl-C still interrupts) and
    is restored on the way out, however that is.
    """
    fd = sys.stdin.fileno() if sys.stdin is not None and sys.stdin.isatty() else None

    def next_key(timeout: float) -> str | None:
        if fd is None:
            time.sleep(timeout)
            return None
        ready, _, _ = select.select([fd], [], [], timeout)
        return os.read(fd, 1).decode(errors="replace") if ready else None

    saved = termios.tcgetattr(fd) if fd is not None else None
    if fd is not None:
        tty.setcbreak(fd)
    try:
        yield next_key
    finally:
        if saved is not None:
            termios.tcsetattr(fd, termios.TCSADRAIN, saved)

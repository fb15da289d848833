"""Task progress: ``self.progress(done, total)`` in a bound task, for ``taskmesh status``/``top`` and Flower.

Three places, for three readers. Celery's own ``PROGRESS`` state (``update_state``) is
what ``AsyncResult.info`` shows. Flower follows task *events*, not the result backend, so
a ``task-progress`` event is sent too (its monitor state becomes ``PROGRESS`` with
``done``/``total``). Both are per task, so a dashboard would have to know every running
task's id first; the Redis hash ``taskmesh:progress`` (field = task id, value = JSON
``{done, total, started, updated, task, worker}``) gives them all in one HGETALL.

Kept cheap for tight loops: a task writes at most once every ``MIN_INTERVAL_S`` (its
first and its last report always), with the process's cached ``app.redis()`` client,
which redis-py reconnects after a fork, so prefork children are safe. The entry is
removed when the run ends: by ``task_postrun`` in the process that ran it, and by
``task_failure``/``task_revoked`` in the worker's main process when the child never got
there (hard time limit, lost child, ``revoke(terminate=True)``). The hash expires
``KEEP_S`` after the last write anywhere, so an entry orphaned otherwise cannot pile up.
A broker error while reporting is logged, never raised: progress must not fail a task.
"""

from __future__ import annotations

import json
import logging
import math
import time
from typing import Any

import redis
from celery import signals
from kombu.exceptions import OperationalError

from taskmesh.state.keys import PROGRESS

log = logging.getLogger(__name__)
STATE = "PROGRESS"
EVENT = "task-progress"  # celery.events.State (so Flower) turns it into state PROGRESS with done and total
MIN_INTERVAL_S = 0.5
KEEP_S = 86400

_started: dict[str, float] = {}  # task id → when it started in this process
_written: dict[str, float] = {}  # task id → when its progress was last written from this process


def report_progress(task: Any, done: float, total: float) -> None:
    """Store how far *task*'s current run is; see the module docstring for where and why."""
    _check(task.name, done, total)
    task_id = task.request.id
    if task_id is None:  # called as a plain function, not run as a task
        return
    now = time.time()
    last = _written.get(task_id)
    if last is not None and done < total and now - last < MIN_INTERVAL_S:
        return
    _written[task_id] = now
    entry = {
        "done": done,
        "total": total,
        "started": _started.get(task_id, now),
        "updated": now,
        "task": task.name,
        "worker": task.request.hostname,
    }
    try:
        with task.app.redis().pipeline(transaction=False) as pipe:
            pipe.hset(PROGRESS, task_id, json.dumps(entry))
            pipe.expire(PROGRESS, KEEP_S)
            pipe.execute()
        task.update_state(state=STATE, meta={"done": done, "total": total})
        if task.app.conf.worker_send_task_events:
            task.send_event(EVENT, retry=False, done=done, total=total)
    except (redis.RedisError, OperationalError, OSError) as exc:
        log.warning("task %s: progress %s/%s not stored: %s", task_id, done, total, exc)


def _check(name: str, done: Any, total: Any) -> None:
    call = f"{name}: self.progress(done={done!r}, total={total!r})"
    for value in (done, total):
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise TypeError(f"{call}: done and total must be finite numbers, e.g. self.progress(3, 10)")
    if total <= 0:
        raise ValueError(f"{call}: total must be above 0; pass the number of steps of the whole run")
    if not 0 <= done <= total:
        raise ValueError(f"{call}: done must be between 0 and total; count the steps finished so far")


def eta_s(entry: dict[str, Any], now: float) -> float | None:
    """Seconds left: elapsed / done × (total − done), less the time since that was measured.

    ``None`` before the first step is done (no rate yet).
    """
    done, total = entry.get("done") or 0, entry.get("total") or 0
    if done <= 0 or total <= 0:
        return None
    updated = entry.get("updated", now)
    elapsed = updated - entry.get("started", updated)
    return max(0.0, elapsed / done * (total - done) - (now - updated))


def _remove(task: Any, task_id: str) -> None:
    app = getattr(task, "app", None)
    if app is None or not hasattr(app, "redis"):
        return
    try:
        app.redis().hdel(PROGRESS, task_id)
    except redis.RedisError as exc:
        log.warning("task %s: progress entry not removed: %s", task_id, exc)


@signals.task_prerun.connect(weak=False)
def _on_start(task_id: str | None = None, **_: Any) -> None:
    if task_id is not None:
        _started[task_id] = time.time()


@signals.task_postrun.connect(weak=False)
def _on_end(task_id: str | None = None, task: Any = None, **_: Any) -> None:
    _started.pop(task_id, None)
    if _written.pop(task_id, None) is not None:
        _remove(task, task_id)


@signals.task_failure.connect(weak=False)
def _on_failure(sender: Any = None, task_id: str | None = None, **_: Any) -> None:
    # In the process that ran the task, task_postrun follows and cleans up.
    if task_id is not None and task_id not in _started:
        _remove(sender, task_id)


@signals.task_revoked.connect(weak=False)
def _on_revoked(sender: Any = None, request: Any = None, **_: Any) -> None:
    task_id = getattr(request, "id", None)
    if task_id is not None and task_id not in _started:
        _remove(sender, task_id)

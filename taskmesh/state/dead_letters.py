"""The dead-letter store: tasks that failed for good, and messages a worker refused to run,
kept so an operator can look, send them again, or drop them (``taskmesh dlq list|requeue|purge``).

A task lands here when Celery gives up on it: it raised and has no retries left, or its
worker process was lost more times than ``max_retries`` allows (taskmesh turns on
Celery's ``task_retry_on_worker_lost``, so a task that kills its process every time is
retried a bounded number of times instead of requeued for ever). One hash, task id →
JSON entry (name, args, kwargs, queue, why, when): requeueing sends the same task, with
the same id, so the caller's ``AsyncResult`` gets the new outcome. A refused message (its
``taskmesh`` header or body could not be read: it would crash or loop a worker) is kept
with its raw headers and body and ``refused: true``; it is not requeued as it is, since
what it holds is what was wrong: send it again, fixed, with the task's own ``.delay()``.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterable
from typing import Any

import redis

from taskmesh.state.keys import COUNTERS, DEAD_LETTERS


def add(client: redis.Redis, task_id: str, entry: dict[str, Any], counted: bool = True) -> None:
    with client.pipeline(transaction=True) as pipe:
        pipe.hset(DEAD_LETTERS, task_id, json.dumps({**entry, "id": task_id, "at": time.time()}, default=repr))
        if counted:
            pipe.hincrby(COUNTERS, "dead_lettered", 1)
        pipe.execute()


def add_dead_letter(client: redis.Redis, reason: str, **message: Any) -> None:
    """Keep one refused message (its task id, task, queue, headers, body ...) with *reason*."""
    task_id = message.get("task_id")
    key = task_id if isinstance(task_id, str) and task_id else f"refused-{uuid.uuid4().hex}"
    add(client, key, {**message, "why": reason, "refused": True}, counted=False)  # the worker counts "refused"


def dead_letters(client: redis.Redis) -> list[dict[str, Any]]:
    """Every entry, newest first."""
    return entries(client)[::-1]


def entries(client: redis.Redis) -> list[dict[str, Any]]:
    """Every entry, oldest first."""
    found = [json.loads(raw) for raw in client.hgetall(DEAD_LETTERS).values()]
    return sorted(found, key=lambda e: e.get("at", 0))


def remove(client: redis.Redis, task_ids: Iterable[str]) -> int:
    ids = list(task_ids)
    return int(client.hdel(DEAD_LETTERS, *ids)) if ids else 0


def requeue(app: Any, client: redis.Redis, task_ids: Iterable[str]) -> list[str]:
    """Send each entry's task again (same id, arguments and queue); returns the ids sent."""
    wanted = set(task_ids)
    sent = []
    for entry in entries(client):
        if entry["id"] not in wanted or entry.get("refused"):
            continue
        app.send_task(entry["task"], args=entry.get("args") or (), kwargs=entry.get("kwargs") or {},
                      task_id=entry["id"], queue=entry.get("queue"))
        remove(client, [entry["id"]])
        sent.append(entry["id"])
    return sent

"""Sending tasks that failed for good to the dead-letter store (``state.dead_letters``).

Celery's own ``task_failure`` signal marks the moment: it fires once a run has failed
for good — in the pool process for an exception with no retry left, in the worker's
main process for a lost worker past ``max_retries`` — and never for a retry. Connected
once per app, for that app's tasks only.
"""

from __future__ import annotations

import logging
from typing import Any

import redis
from celery import signals

from taskmesh.state import dead_letters

log = logging.getLogger(__name__)


def connect_dead_letters(app: Any) -> None:
    def on_failure(sender: Any = None, task_id: str | None = None, exception: BaseException | None = None,
                   args: Any = None, kwargs: Any = None, **_: Any) -> None:
        if getattr(sender, "app", None) is not app or task_id is None:
            return
        request = sender.request
        entry = {
            "task": sender.name,
            "args": list(args or ()),
            "kwargs": dict(kwargs or {}),
            "queue": (request.delivery_info or {}).get("routing_key"),
            "retries": request.retries,
            "why": f"{type(exception).__name__}: {exception}",
        }
        try:
            dead_letters.add(app.redis(), task_id, entry)
        except redis.RedisError as exc:
            log.warning("task %s failed for good and could not be dead-lettered: %s", task_id, exc)

    signals.task_failure.connect(on_failure, weak=False, dispatch_uid=f"taskmesh-dead-letters-{id(app)}")

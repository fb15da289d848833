"""The pool child's half of ``once=True``: the moment a body returns, its run is done.

The worker's main process marks a run done only when it acknowledges the message, which
a SIGKILL of that process can forestall after the body has finished; the mark written
here, from the process that ran the body, closes that gap (``state.once``).
"""

from __future__ import annotations

import logging
from typing import Any

import redis

from taskmesh.state.once import keep_done_s, mark_returned

log = logging.getLogger(__name__)


def mark_body_returned(task: Any) -> None:
    """Mark this run of a ``once=True`` task done; a Redis error is logged (the worker's own
    mark at acknowledgement remains), never raised, since the body has already run."""
    request = task.request
    try:
        mark_returned(task.app.redis(), request.id, int(request.retries or 0),
                      keep_done_s(task.app.conf.result_expires))
    except redis.RedisError as exc:
        log.warning("task %s (once=True) ran, but its run could not be marked done yet: %s", request.id, exc)

"""A worker survives what kombu cannot read off its Redis lists.

kombu's Redis channel pops a message (``BRPOP``; a taskmesh worker's ``fetch``), parses
the stored envelope and builds a ``Message`` inside the event loop; an item that is not
JSON, not a mapping, or whose ``headers``/``properties`` are of the wrong type raises
there, outside anything Celery catches, and the worker stops with "Unrecoverable error"
(plain Celery does the same). Such an item was already taken off its list, and nothing
is kept for it in kombu's unacked hash (``fetch`` removes the record it wrote), so it
cannot be acknowledged or delivered again: it is logged
as dropped, with the fix, and the loop goes on. Broker connection errors still
propagate, so Celery reconnects as before. Everything readable reaches Celery and the
admission controller as usual; messages that Celery could read but taskmesh cannot
run are refused there (``refusal``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from queue import Empty
from typing import Any

log = logging.getLogger(__name__)
GUARDED = "_taskmesh_guarded"


def guard_unreadable(consumer: Any, count: Callable[[], None]) -> None:
    """Wrap the ``BRPOP`` handler of *consumer*'s channel (again after each reconnect)."""
    channel = getattr(consumer.task_consumer, "channel", None)
    handlers = getattr(channel, "handlers", None)
    if not isinstance(handlers, dict) or "BRPOP" not in handlers or getattr(handlers["BRPOP"], GUARDED, False):
        return
    read = handlers["BRPOP"]
    passed = (Empty, *channel.connection_errors)  # "nothing there" and a lost connection keep kombu's meaning

    def guarded(**options: Any) -> Any:
        try:
            return read(**options)
        except passed:
            raise
        except Exception as exc:  # an unreadable item must not stop the worker
            count()
            log.error("dropped an item on this worker's queues that is not a readable kombu message (%s: %s); "
                      "it was already taken off its list. Fix: publish tasks with Celery (apply_async, send_task), "
                      "never by writing to the Redis lists", type(exc).__name__, exc)
            return False

    setattr(guarded, GUARDED, True)
    handlers["BRPOP"] = guarded

"""Wake the idle workers of a queue as a message is sent to it.

A worker's fetch (``worker/fetch.py``) pops and records in one script, and a script cannot
block: with nothing to take, the worker waits in Redis on a ``BLPOP`` of its queues' wake
lists, with a short timeout. A taskmesh producer pushes one token to the queue's wake list
after each send (``app.sending.wake_idle_workers``), which ends that wait at once; a plain
kombu or Celery producer pushes none, nor do a worker's own sends on (a reroute, a
hand-over, a put-back), and their messages wait for the timeout. The list is trimmed to
one token, so a busy queue does not grow one per message: one token wakes one idle
worker, which fetches while its prefetch allows; other idle workers of the queue wait out
their timeout. It expires, so a queue nobody consumes leaves nothing behind.
"""

from __future__ import annotations

from typing import Any

from taskmesh.state.keys import FETCH_WAKE

TOKEN_S = 60  # a token nobody took goes this long after the last send


def wake_key(queue: str, keyprefix: str = "") -> str:
    return f"{keyprefix}{FETCH_WAKE}{queue}"


def wake(client: Any, queue: str, keyprefix: str = "") -> None:
    """One round trip: push the token, keep one, let it expire."""
    key = wake_key(queue, keyprefix)
    pipe = client.pipeline(transaction=False)
    pipe.lpush(key, 1)
    pipe.ltrim(key, 0, 0)
    pipe.expire(key, TOKEN_S)
    pipe.execute()

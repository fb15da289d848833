"""Dead letters: the messages a worker refused to run, kept with the reason.

A message whose ``taskmesh`` header or body cannot be read is acknowledged (it would
crash or loop a worker otherwise) and its content kept here, newest first, capped at
``KEEP``, so an operator can see what was refused and why and send it again, fixed.
A plain Redis list rather than a kombu queue: nothing consumes it by accident, and
each entry carries the refusal beside the message.
"""

from __future__ import annotations

import json
import time
from typing import Any

import redis

from taskmesh.state.keys import DEAD_LETTERS

KEEP = 1000


def add_dead_letter(client: redis.Redis, reason: str, **message: Any) -> None:
    """Keep one refused message (its id, task, queue, headers, body ...) with *reason*."""
    entry = json.dumps({"at": time.time(), "reason": reason, **message}, default=repr)
    with client.pipeline() as pipe:
        pipe.lpush(DEAD_LETTERS, entry)
        pipe.ltrim(DEAD_LETTERS, 0, KEEP - 1)
        pipe.execute()


def dead_letters(client: redis.Redis, limit: int = KEEP) -> list[dict[str, Any]]:
    """The refused messages kept, newest first."""
    return [json.loads(raw) for raw in client.lrange(DEAD_LETTERS, 0, limit - 1)]

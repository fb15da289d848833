"""Exclusive batch mode in Redis: which batch has every GPU, and what to reload after it.

One key holds the id of the exclusive batch running now, set only if none is (``NX``)
and kept as a lease: the GPU workers taking part push its expiry back while the batch
has items left, and end it (only if it is still theirs) once every item has finished.
Should they all die, it expires and the fleet goes back to its other GPU work; items
left stay in their queue, which GPU workers always consume. Each worker notes the
models warm in it at entry, so they can be loaded again afterwards (``reload_after``).
"""

from __future__ import annotations

import json
import time
from typing import Any

import redis

from taskmesh.state.client import lua
from taskmesh.state.keys import EXCLUSIVE, EXCLUSIVE_INFO, EXCLUSIVE_WARM

LEASE_S = 60


class ExclusiveBatches:
    def __init__(self, client: redis.Redis) -> None:
        self.client = client

    def begin(self, batch_id: str, task: str, total: int, reload_after: bool) -> str | None:
        """Make *batch_id* the exclusive batch; returns the id of the one already running instead."""
        info = {"batch": batch_id, "task": task, "total": total, "since": time.time(), "reload_after": reload_after}
        pipe = self.client.pipeline(transaction=True)
        pipe.set(EXCLUSIVE, batch_id, nx=True, ex=LEASE_S)
        pipe.get(EXCLUSIVE)
        taken, holder = pipe.execute()
        if not taken:
            return holder.decode() if holder else "?"
        self.client.hset(EXCLUSIVE_INFO, batch_id, json.dumps(info))
        return None

    def current(self) -> dict[str, Any] | None:
        """The exclusive batch running now (its info), or None."""
        batch = self.client.get(EXCLUSIVE)
        if batch is None:
            return None
        return self.info(batch.decode()) or {"batch": batch.decode()}

    def info(self, batch_id: str) -> dict[str, Any] | None:
        raw = self.client.hget(EXCLUSIVE_INFO, batch_id)
        return json.loads(raw) if raw else None

    def extend(self, batch_id: str) -> None:
        if self.client.get(EXCLUSIVE) == batch_id.encode():
            self.client.expire(EXCLUSIVE, LEASE_S)

    def end(self, batch_id: str) -> bool:
        """End the mode if *batch_id* still holds it; ``True`` if this call ended it."""
        return bool(self.client.eval(lua("release_lock"), 1, EXCLUSIVE, batch_id))

    def note_warm(self, batch_id: str, node: str, models: list[str]) -> None:
        key = EXCLUSIVE_WARM + batch_id
        pipe = self.client.pipeline(transaction=False)
        pipe.hset(key, node, json.dumps(sorted(models)))
        pipe.expire(key, 86400)
        pipe.execute()

    def take_warm(self, batch_id: str, node: str) -> list[str]:
        """The models *node* had warm when the batch began (once: a second call gets none)."""
        key = EXCLUSIVE_WARM + batch_id
        pipe = self.client.pipeline(transaction=True)
        pipe.hget(key, node)
        pipe.hdel(key, node)
        raw, _ = pipe.execute()
        return json.loads(raw) if raw else []

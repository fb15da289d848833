"""Run-once claims for ``@app.task(once=True)``: which deliveries of a task are running or done.

One key per task id and retry (a retry is a new run on purpose; a second delivery of
the same run is a duplicate): ``running:<holder>`` while a live worker holds it, with an
expiry its heartbeat pushes back, then ``done`` for as long as results are kept. A
holder that dies stops refreshing, its claim expires, and the redelivered message runs:
at least once on a crash, never twice while the first holder lives.
"""

from __future__ import annotations

from collections.abc import Sequence

import redis

from taskmesh.state.client import lua
from taskmesh.state.keys import ONCE_PREFIX


def once_key(task_id: str, retries: int) -> str:
    return f"{ONCE_PREFIX}{task_id}:{retries}"


class OnceClaims:
    def __init__(self, client: redis.Redis, holder: str, ttl_s: float, keep_done_s: int) -> None:
        self.client = client
        self.holder = holder
        self.ttl_s = max(1, round(ttl_s))
        self.keep_done_s = max(1, keep_done_s)
        self._claim = client.register_script(lua("once_claim"))
        self._refresh = client.register_script(lua("once_refresh"))

    def claim(self, key: str) -> str:
        """``claimed`` (now ours), ``mine`` (ours already), ``running`` (another holder's) or ``done``."""
        answer = self._claim(keys=[key], args=[self.holder, self.ttl_s])
        return answer.decode() if isinstance(answer, bytes) else str(answer)

    def done(self, key: str) -> None:
        self.client.set(key, "done", ex=self.keep_done_s)

    def release(self, key: str) -> None:
        """Give a claim back (the message goes back to the queue), if it is still ours."""
        if self.client.get(key) == f"running:{self.holder}".encode():
            self.client.delete(key)

    def refresh(self, keys: Sequence[str]) -> int:
        return int(self._refresh(keys=list(keys), args=[self.holder, self.ttl_s])) if keys else 0

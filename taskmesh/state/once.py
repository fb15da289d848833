"""Run-once claims for ``@app.task(once=True)``: which deliveries of a task are running or done.

One key per task id and retry (a retry is a new run on purpose; a second delivery of
the same run is a duplicate): ``running:<holder>`` while a live worker holds it, with an
expiry its heartbeat pushes back, then ``done`` for as long as results are kept. A
holder that dies stops refreshing, its claim expires, and the redelivered message runs:
at least once on a crash, never twice while the first holder lives.

The worker's main process marks a run ``done`` when it acknowledges the message, but the
body ran in a pool child, which may have returned well before: a worker SIGKILLed in
between would leave a claim that expires, and a body that had finished would run again.
So the child marks the key ``returned`` the moment the body returns (``mark_returned``),
and nothing overwrites that. It also covers Celery's retry after a lost pool child
(``task_retry_on_worker_lost``), which sends the same run again as the next retry: a retry
whose previous attempt's body returned is not a new run (a deliberate ``self.retry()``
raises, so its body never returns), and is skipped as done.
"""

from __future__ import annotations

import datetime
from collections.abc import Sequence
from typing import Any

import redis

from taskmesh.state.client import lua
from taskmesh.state.keys import ONCE_PREFIX


def once_key(task_id: str, retries: int) -> str:
    return f"{ONCE_PREFIX}{task_id}:{retries}"


def keep_done_s(result_expires: Any) -> int:
    """How long a finished run is remembered: as long as its result is (``result_expires``)."""
    if isinstance(result_expires, datetime.timedelta):
        return int(result_expires.total_seconds()) or 86400
    return int(result_expires or 86400)


def mark_returned(client: redis.Redis, task_id: str, retries: int, keep_s: int) -> None:
    """From the pool child, as the body returns: this run is done, whatever befalls its worker next."""
    client.set(once_key(task_id, retries), "returned", ex=max(1, keep_s))


class OnceClaims:
    def __init__(self, client: redis.Redis, holder: str, ttl_s: float, keep_done_s: int) -> None:
        self.client = client
        self.holder = holder
        self.ttl_s = max(1, round(ttl_s))
        self.keep_done_s = max(1, keep_done_s)
        self._claim = client.register_script(lua("once_claim"))
        self._done = client.register_script(lua("once_done"))
        self._refresh = client.register_script(lua("once_refresh"))

    def claim(self, key: str, previous: str | None = None) -> str:
        """``claimed`` (now ours), ``mine`` (ours already), ``running`` (another holder's) or ``done``
        (this run, or the *previous* attempt whose body returned, ended)."""
        answer = self._claim(keys=[key] + ([previous] if previous else []), args=[self.holder, self.ttl_s])
        return answer.decode() if isinstance(answer, bytes) else str(answer)

    def done(self, key: str) -> None:
        self._done(keys=[key], args=[self.keep_done_s])

    def release(self, key: str) -> None:
        """Give a claim back (the message goes back to the queue), if it is still ours."""
        if self.client.get(key) == f"running:{self.holder}".encode():
            self.client.delete(key)

    def refresh(self, keys: Sequence[str]) -> int:
        return int(self._refresh(keys=list(keys), args=[self.holder, self.ttl_s])) if keys else 0

"""Orphaned messages: unacknowledged in kombu's ``unacked`` hash, held by no worker.

A worker says which messages it holds (``Registry.holding``, then every announcement),
and dead-worker recovery gives back what a dead worker said it held. Two gaps remain,
both seen in the chaos suite: a worker SIGKILLed in the instant between kombu recording
a delivery and the worker saying it holds it, and a task that ended while its worker's
connection was down, so its acknowledgement never reached Redis and the worker no longer
holds it. Either message would wait for Redis's visibility timeout (hours).

So a message is *orphaned* when it has been unacknowledged longer than ``dead_after_s``
by kombu's delivery time (a host clock, used only to pick candidates) and no worker's
in-flight set names it in two looks ``dead_after_s`` apart by Redis's own clock
(``lua/orphans.lua``); it is then delivered again, like a dead worker's. Only messages
a taskmesh app sent are considered (a worker without taskmesh's step announces nothing).
"""

from __future__ import annotations

import socket

import redis

from taskmesh.state.client import lua
from taskmesh.state.keys import INFLIGHT, ORPHAN_SWEEP, ORPHANS

CANDIDATES = 500  # the oldest deliveries looked at per sweep


class OrphanWatch:
    def __init__(self, client: redis.Redis, dead_after_s: float) -> None:
        self.client = client
        self.dead_after_s = dead_after_s
        self._settle = client.register_script(lua("orphans"))

    def due(self) -> bool:
        """One sweep per quarter of ``dead_after_s`` in the whole fleet."""
        return bool(self.client.set(ORPHAN_SWEEP, socket.gethostname(), nx=True,
                                    ex=max(1, int(self.dead_after_s / 4))))

    def held(self) -> set[str]:
        """Every delivery tag some worker (alive, dead or stopped and not yet forgotten) holds."""
        keys = list(self.client.scan_iter(match=f"{INFLIGHT}*", count=1000))
        return {t.decode() for t in self.client.sunion(keys)} if keys else set()

    def settle(self, unheld: list[str]) -> list[str]:
        """Note *unheld* (the candidates no worker holds now); returns those held by none since
        ``dead_after_s`` ago, by Redis's clock."""
        due = self._settle(keys=[ORPHANS], args=[self.dead_after_s, *unheld])
        return [t.decode() if isinstance(t, bytes) else str(t) for t in due]

    def forget(self, tag: str) -> None:
        self.client.hdel(ORPHANS, tag)

"""The heartbeat thread: announce the worker, refresh its reservations, recover dead
workers' messages.

A thread, not the event loop, so a ``solo`` worker busy with a long task is not
mistaken for a dead one. It beats every ``HEARTBEAT_S``, and soon (coalesced, at
most once per ``MIN_BEAT_S``) after what the worker holds changes.
"""

from __future__ import annotations

import collections
import logging
import threading
from typing import Any

from taskmesh.core.config_schema import HEARTBEAT_S
from taskmesh.worker.controller import AdmissionController
from taskmesh.worker.recovery import reclaim_dead_workers
from taskmesh.worker.report import Reporter

log = logging.getLogger(__name__)
MIN_BEAT_S = 1.0


class Heartbeat:
    def __init__(self, app: Any, controller: AdmissionController, reporter: Reporter) -> None:
        self.app = app
        self.controller = controller
        self.reporter = reporter
        self.stopping = threading.Event()
        self._flushed: collections.Counter[str] = collections.Counter()  # counters already added to fleet totals
        self.thread = threading.Thread(target=self._run, name="taskmesh-heartbeat", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.stopping.set()

    def _run(self) -> None:
        controller = self.controller
        while not self.stopping.is_set():
            try:
                self.beat()
            except Exception:  # the next beat tries again; a dead Redis must not kill the thread
                log.exception("taskmesh heartbeat failed")
            controller.changed.wait(HEARTBEAT_S)
            controller.changed.clear()
            self.stopping.wait(MIN_BEAT_S)

    def beat(self) -> None:
        """Registry, reservation refresh, dead workers' messages."""
        c = self.controller
        tags, reservations = c.held_tags(), c.held_reservations()
        counters = dict(c.counters)
        deltas = {k: v - self._flushed[k] for k, v in counters.items() if k != "ticks"}
        with c.lock:
            runtimes, c.runtimes = c.runtimes, collections.Counter()
        state = self.reporter.state()
        self.reporter.announced_pool_size = state["pool"]["size"]
        c.registry.announce(self.reporter.record(), tags, state=state, counters=deltas, runtimes=runtimes)
        self._flushed.update(deltas)
        c.gate.ledger.refresh(reservations, c.gate.pools())
        reclaim_dead_workers(self.app, c.registry, c.registry.client)

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
import time
from collections.abc import Callable
from typing import Any

import redis
from kombu.utils.url import maybe_sanitize_url

from taskmesh.state.client import broker_redis_url
from taskmesh.worker.controller import AdmissionController
from taskmesh.worker.recovery import reclaim_dead_workers
from taskmesh.worker.report import Reporter

log = logging.getLogger(__name__)
HEARTBEAT_S = 2.0
MIN_BEAT_S = 1.0


class Heartbeat:
    def __init__(self, app: Any, controller: AdmissionController, reporter: Reporter) -> None:
        self.app = app
        self.controller = controller
        self.reporter = reporter
        self.stopping = threading.Event()
        self.refreshers: list[Callable[[], None]] = []  # other claims this worker keeps alive (run-once)
        self._flushed: collections.Counter[str] = collections.Counter()  # counters already added to fleet totals
        self.thread = threading.Thread(target=self._run, name="taskmesh-heartbeat", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.stopping.set()

    def _run(self) -> None:
        controller = self.controller
        failed_since: float | None = None
        failed_beats = 0
        while not self.stopping.is_set():
            try:
                self.beat()
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                # One line when the broker goes and one when it is back, not a traceback a beat.
                if failed_since is None:
                    failed_since = time.monotonic()
                    log.warning("taskmesh heartbeat: broker %s unreachable (%s); heartbeats retry every %.0fs",
                                self._broker(), " ".join(str(exc).split()), HEARTBEAT_S)
                failed_beats += 1
            except Exception:  # the next beat tries again; nothing may kill the thread
                log.exception("taskmesh heartbeat failed")
            else:
                if failed_since is not None:
                    log.warning("taskmesh heartbeat: broker %s reachable again after %d failed heartbeats (%.0fs)",
                                self._broker(), failed_beats, time.monotonic() - failed_since)
                    failed_since, failed_beats = None, 0
            controller.changed.wait(HEARTBEAT_S)
            controller.changed.clear()
            self.stopping.wait(MIN_BEAT_S)

    def _broker(self) -> str:
        return maybe_sanitize_url(broker_redis_url(self.app))

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
        for refresh in self.refreshers:
            refresh()
        reclaim_dead_workers(self.app, c.registry, c.registry.client)

"""The heartbeat thread: renew the worker's lease and announce it, refresh (and write back)
its reservations, recover dead workers' messages and orphaned ones.

A thread, not the event loop, so a ``solo`` worker busy with a long task is not
mistaken for a dead one. It beats every ``HEARTBEAT_S``, and soon (coalesced, at
most once per ``MIN_BEAT_S``) after what the worker holds changes.

When a renewal shows the lease was lost (``worker.lease``), intake stays paused until
the worker has announced itself again and re-created the reservations of what it still
runs; what was given back elsewhere meanwhile is dropped if held, and reported as a
possible duplicate if it runs or ran here. A worker recovers others' messages only once
it has itself held its lease for ``dead_after_s`` without a break.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import redis

from taskmesh.core.config_schema import HEARTBEAT_S
from taskmesh.core.redact import redacted
from taskmesh.state.client import state_redis_url
from taskmesh.state.orphans import OrphanWatch
from taskmesh.worker.controller import AdmissionController
from taskmesh.worker.recovery import reclaim_dead_workers, reclaim_orphans
from taskmesh.worker.report import Reporter
from taskmesh.worker.strategy import live_request_ids

log = logging.getLogger(__name__)
MIN_BEAT_S = 1.0


class Heartbeat:
    def __init__(self, app: Any, controller: AdmissionController, reporter: Reporter) -> None:
        self.app = app
        self.controller = controller
        self.reporter = reporter
        self.stopping = threading.Event()
        self.refreshers: list[Callable[[], None]] = []  # other claims this worker keeps alive (run-once)
        self._flushed: collections.Counter[str] = collections.Counter()  # counters already added to fleet totals
        self._announced: set[str] = set()  # the delivery tags the last announcement said this worker holds
        self.orphans = OrphanWatch(controller.registry.client, controller.registry.dead_after_s)
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
            self.stopping.wait(MIN_BEAT_S)
            controller.changed.wait(HEARTBEAT_S - MIN_BEAT_S)
            controller.changed.clear()

    def _broker(self) -> str:
        return redacted(state_redis_url(self.app))

    def beat(self) -> None:
        """Lease and registry, reservation refresh, dead workers' messages."""
        c = self.controller
        added = c.registry.take_added()  # before the snapshot: a tag added after it stays for the next beat
        tags = c.held_tags()
        counters = dict(c.counters)
        deltas = {k: v - self._flushed[k] for k, v in counters.items() if k != "ticks"}
        with c.lock:
            runtimes, c.runtimes = c.runtimes, collections.Counter()
        state = self.reporter.state()
        self.reporter.announced_pool_size = state["pool"]["size"]
        sent_at = time.monotonic()
        gone = (self._announced | added) - set(tags)  # only these leave the set: tags added meanwhile stay
        renewal = c.registry.announce(self.reporter.record(), tags, state=state, counters=deltas, runtimes=runtimes,
                                      gone=gone)
        self._announced = set(tags)
        self._flushed.update(deltas)
        lost, given_back = c.lease.renewed(renewal)
        if lost:
            c.consumer.call_soon(c.retry_held)  # pauses intake now, not at the next tick
        if given_back:
            c.consumer.call_soon(forget_given_back, c, given_back)
        recreated = self.refresh()
        for refresh in self.refreshers:
            refresh()
        if c.gate.known:  # a GPU worker: follow an exclusive batch
            c.exclusive.poll()
        c.lease.holds(sent_at)
        if lost:
            log.warning("this worker's lease was lost (%s): it took no new work until it announced itself again "
                        "and re-created the reservations of the %d task(s) it runs", lost, len(c.reservations))
            c.consumer.call_soon(c.retry_held)
        elif recreated:
            log.warning("re-created %d reservation(s) the ledger had lost (expired, a Redis restart or deleted "
                        "keys) for tasks still running here: %s", len(recreated), ", ".join(recreated))
        if c.lease.held_for() >= c.registry.dead_after_s:
            reclaim_dead_workers(self.app, c.registry, c.registry.client)
            reclaim_orphans(self.app, self.orphans)

    def refresh(self) -> list[str]:
        """Refresh what this worker holds, writing back what the ledger lost; returns what was
        written back. A task that ended meanwhile may have released before the write: undone."""
        c = self.controller
        held = c.held_reservations()
        recreated = c.gate.ledger.refresh(held)
        still = c.held_reservations()
        for reservation in recreated:
            if reservation not in still:
                c.gate.ledger.release(reservation, held[reservation])
        return [r for r in recreated if r in still]


def forget_given_back(controller: AdmissionController, given: dict[str, str]) -> None:
    """On the event loop, where held messages start. Messages given back elsewhere are no
    longer this worker's: a held copy is dropped (rejecting it is safe: the copy delivered
    again has a new delivery tag, so this removes nothing of it); one that runs or ran here
    is the duplicate at-least-once allows, counted and logged."""
    kept: collections.deque[Any] = collections.deque()
    dropped = set()
    while controller.held:
        held = controller.held.popleft()
        if str(held.message.delivery_tag) in given:
            held.message.reject(requeue=True)
            dropped.add(str(held.message.delivery_tag))
            log.warning("dropped held task %s: it was delivered again elsewhere", held.message.headers.get("id"))
        else:
            kept.append(held)
    controller.held.extend(kept)
    with controller.lock:
        for tag, task_id in given.items():
            if controller.tags.get(task_id) == tag:
                del controller.tags[task_id]
        running = set(controller.reservations) | live_request_ids()
    for tag, task_id in given.items():
        if tag not in dropped:
            controller.counters["duplicates_detected"] += 1
            log.warning("task %s was delivered again while this worker was presumed dead, and it %s here: "
                        "it may run twice (counted in duplicates_detected)", task_id,
                        "still runs" if task_id in running else "already ran")
    controller.retry_held()

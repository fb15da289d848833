"""The admission controller: one per worker, between Celery's consumer and the ``Gate``.

It owns the worker-side state of admission: the messages held because they do not
fit yet (in arrival order — the head of the line is never overtaken, so a large
task cannot be starved by small ones), the reservations of admitted tasks, and why
intake is paused. ``admission.py`` wires it into Celery; the decisions themselves
are the ``Gate``'s.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from celery.utils.time import maybe_iso8601, maybe_make_aware
from celery.worker import state as worker_state

from .activity import GpuActivity
from .gate import Admitted, Decision, Gate, Reroute, Wait, fits
from .profiles import Profile
from .registry import GpuRecord, Registry, WorkerRecord
from .requirements import HEADER, Requirement

log = logging.getLogger(__name__)
GPUS_HEADER = "taskmesh_gpus"
RECONCILE_AFTER_S = 2.0
EVENT_EVERY_S = 5.0


def _expired(expires: Any) -> bool:
    """Past the message's ``expires`` (ISO 8601, as Celery sends it)."""
    try:
        return expires is not None and maybe_make_aware(maybe_iso8601(expires)) < datetime.now(UTC)
    except (TypeError, ValueError):
        return False  # Celery's own Request reports a malformed one when it is handed over


@dataclasses.dataclass(frozen=True)
class Running:
    """An admitted task: what it holds, and what is needed to learn its run time."""

    admitted: Admitted
    since: float  # monotonic, when handed to the pool
    queue: str | None
    task: str | None


@dataclasses.dataclass
class Held:
    message: Any
    proceed: Callable[[], Any]
    requirement: Requirement
    since: float


class AdmissionController:
    def __init__(self, consumer: Any, gate: Gate, registry: Registry, incarnation: str) -> None:
        self.consumer = consumer
        self.gate = gate
        self.registry = registry
        self.incarnation = incarnation
        self.node = consumer.hostname
        self.lock = threading.Lock()
        self.held: collections.deque[Held] = collections.deque()
        self.reservations: dict[str, Running] = {}
        self.tags: dict[str, str] = {}  # task id → delivery tag of messages this worker holds
        self.reasons: dict[str, str] = {}  # why intake is paused: kind → detail
        self.paused_queues: list[str] = []
        self.counters = collections.Counter()
        self._flushed = collections.Counter()  # counters already added to the fleet totals
        self.activity = GpuActivity()
        self.assist: str | None = None  # the extra queue the rebalancer asked this worker to serve
        self.runtimes: collections.Counter[str] = collections.Counter()  # "q:<queue>:sum"/":count", "t:<task>:..."
        self.subscribed: set[str] = set()
        self.changed = threading.Event()  # wakes the heartbeat: what this worker holds changed
        self._announced_pool_size: int | None = None
        self.pool_history: list[tuple[float, int]] = []  # (time, size) after each resize
        self._last_event = 0.0
        self._last_state: Any = None

    # --- messages -------------------------------------------------------------------

    def offer(self, message: Any, proceed: Callable[[], Any]) -> None:
        """A message arrived: run it, hold it, or send it where it can run."""
        requirement = Requirement.from_header(message.headers.get(HEADER) or {})
        task_id = message.headers.get("id")
        with self.lock:
            self.tags[task_id] = str(message.delivery_tag)
        self.changed.set()
        held = Held(message, proceed, requirement, time.monotonic())
        if self.held or self._blocked():
            self._hold(held)
            return
        if not self._try(held):
            self._hold(held)

    def _try(self, held: Held) -> bool:
        """Decide for *held*; ``False`` means it must wait."""
        message = held.message
        task_id = message.headers.get("id")
        if task_id in worker_state.revoked or _expired(message.headers.get("expires")):
            held.proceed()  # revoked or expired while held: Celery discards it, with nothing reserved
            return True
        if task_id in self.reservations:  # a retry delivered before its last run let go: that release would free it
            decision: Decision = Wait(f"the previous run of {task_id} still holds its reservation")
        else:  # by incarnation: a restart under the same name must not adopt its predecessor's reservation
            decision = self.gate.decide(held.requirement, f"{self.node}#{self.incarnation}/{task_id}")
        if isinstance(decision, Wait):
            self.counters["waits"] += 1
            self.reasons["waiting"] = decision.reason
            return False
        if isinstance(decision, Reroute):
            self._reroute(message, decision.queue, held.requirement)
            return True
        message.headers[GPUS_HEADER] = list(decision.gpus)
        queue = (message.delivery_info or {}).get("routing_key")
        with self.lock:
            self.reservations[task_id] = Running(decision, time.monotonic(), queue, message.headers.get("task"))
            self.activity.started(decision.gpus, task_id, message.headers.get("task"))
        self.counters["admitted"] += 1
        held.proceed()
        return True

    def _hold(self, held: Held) -> None:
        self.held.append(held)
        self.counters["held"] += 1
        if "unhealthy" in self.reasons:  # a message that arrives as the GPU fails goes to a healthy one
            self._requeue_held("this worker's GPUs are unhealthy")
        self._update_intake()

    def _reroute(self, message: Any, queue: str, requirement: Requirement) -> None:
        """Publish the message to the queue of GPUs that can run it, then ack it here."""
        self.registry.register_need_queue(queue, requirement.vram_mib, requirement.min_compute_capability)
        app = self.consumer.app
        with app.producer_or_acquire() as producer:
            producer.publish(
                message.body,
                exchange=queue,
                routing_key=queue,
                declare=[app.amqp.queues[queue]],
                content_type=message.content_type,
                content_encoding=message.content_encoding,
                headers=message.headers,
                **{k: v for k, v in message.properties.items() if k in ("priority", "correlation_id", "reply_to")},
            )
        message.ack()
        with self.lock:
            self.tags.pop(message.headers.get("id"), None)
        self.counters["rerouted"] += 1
        log.info("task %s can never fit this worker's GPUs; sent to queue %s", message.headers.get("id"), queue)

    def finished(self, task_id: str) -> None:
        """A request ended (any thread): release its reservation and let the line move."""
        with self.lock:
            entry = self.reservations.pop(task_id, None)
            self.tags.pop(task_id, None)
            if entry is not None:
                self.activity.ended(entry.admitted.gpus, task_id)
        if entry is not None:
            self.gate.ledger.release(entry.admitted.reservation, entry.admitted.pools)
            self.counters["released"] += 1
            self._observe_runtime(entry)
            if self.held:
                self.consumer.call_soon(self.retry_held)

    def _observe_runtime(self, entry: Running) -> None:
        """Learned run times (per queue and per task), for the rebalancer's expected work.

        Measured here, from hand-over to the pool until the request ends, because
        Celery's own ``time_start`` is wall-clock in prefork and monotonic elsewhere.
        """
        seconds = time.monotonic() - entry.since
        with self.lock:
            for key in (f"q:{entry.queue}", f"t:{entry.task}"):
                self.runtimes[f"{key}:sum"] += seconds
                self.runtimes[f"{key}:count"] += 1

    def set_assist(self, queue: str | None) -> None:
        """Serve *queue* besides this worker's own (``None``: only its own), honouring a pause."""
        old, self.assist = self.assist, queue
        if old == queue:
            return
        if self.paused_queues:
            self.paused_queues = [q for q in self.paused_queues if q != old] + ([queue] if queue else [])
            return
        if old:
            self.consumer.cancel_task_queue(old)
        if queue:
            self.consumer.add_task_queue(queue)
        log.info("rebalancer: now also serving %s (was %s)", queue, old)

    def resize(self, delta: int) -> int:
        """Grow or shrink the pool by *delta* (remote control thread); returns the new size."""
        pool = self.consumer.pool
        if delta > 0:
            pool.grow(delta)
        elif delta < 0:
            pool.shrink(-delta)
        self.consumer._update_prefetch_count(delta)
        size = pool.num_processes
        self.pool_history.append((time.time(), size))
        del self.pool_history[:-20]
        self.changed.set()
        return size

    def retry_held(self) -> None:
        while self.held and not self._blocked():
            if not self._try(self.held[0]):
                break
            self.held.popleft()
        if not self.held:
            self.reasons.pop("waiting", None)
        self._update_intake()

    def _requeue_before_redelivery(self) -> None:
        """Hand back held messages at half the visibility timeout.

        Redis delivers an unacknowledged message again once the timeout passes,
        counting from delivery; a message held that long would then run twice.
        Requeued, it waits in the queue instead (at the back of the line).
        """
        options = self.consumer.app.conf.broker_transport_options or {}
        limit = float(options.get("visibility_timeout", 3600)) / 2
        if self.held and time.monotonic() - self.held[0].since > limit:
            self._requeue_held(f"held longer than half the visibility timeout ({limit:.0f}s)")

    def _requeue_held(self, why: str) -> None:
        while self.held:
            held = self.held.popleft()
            held.message.reject(requeue=True)
            with self.lock:
                self.tags.pop(held.message.headers.get("id"), None)
            self.counters["requeued"] += 1
            log.warning("requeued task %s: %s", held.message.headers.get("id"), why)

    # --- intake ---------------------------------------------------------------------

    def _blocked(self) -> bool:
        return any(kind != "waiting" for kind in self.reasons)

    def _update_intake(self) -> None:
        should_pause = bool(self.held) or self._blocked()
        if should_pause and not self.paused_queues:
            self.paused_queues = [q.name for q in self.consumer.task_consumer.queues]
            for queue in self.paused_queues:
                self.consumer.cancel_task_queue(queue)
            self.counters["pauses"] += 1
            log.info("paused intake of %s: %s", self.paused_queues, self.reasons)
        elif not should_pause and self.paused_queues:
            queues, self.paused_queues = self.paused_queues, []
            for queue in queues:
                self.consumer.add_task_queue(queue)
            log.info("resumed intake of %s", queues)

    # --- periodic work --------------------------------------------------------------

    def tick(self) -> None:
        """Every half second on the event loop: health, pressure, the held line, leftovers."""
        if self.consumer.pool.num_processes != self._announced_pool_size:
            self.changed.set()  # a resized pool is announced now, not at the next heartbeat
        self.check()
        self._requeue_before_redelivery()
        self.retry_held()
        self._reconcile()
        self._maybe_send_event()

    def check(self) -> None:
        """GPU health on GPU workers, host pressure on CPU workers; pauses or resumes intake."""
        if self.gate.known:
            unhealthy = [g for g in self.gate.gpus() if not g.healthy]
            if unhealthy and len(unhealthy) == len(self.gate.known):
                if "unhealthy" not in self.reasons:
                    self.reasons["unhealthy"] = ", ".join(f"GPU {g.index} ({g.uuid})" for g in unhealthy)
                    self._requeue_held("this worker's GPUs are unhealthy")
            else:
                self.reasons.pop("unhealthy", None)
            self._subscribe_need_queues()
        elif pressure := self.gate.host_pressure():
            self.reasons["pressure"] = pressure
        else:
            self.reasons.pop("pressure", None)
        self._update_intake()

    def _reconcile(self) -> None:
        live = {request.id for request in worker_state.reserved_requests}
        cutoff = time.monotonic() - RECONCILE_AFTER_S
        with self.lock:
            stale = [tid for tid, run in self.reservations.items() if run.since < cutoff and tid not in live]
        for task_id in stale:
            self.finished(task_id)

    def _subscribe_need_queues(self) -> None:
        if self.counters["ticks"] % 4 == 0:
            margin = self.gate.config.safety_margin_mib
            for name, (vram, cc) in self.registry.need_queues().items():
                if name in self.subscribed:
                    continue
                need = Requirement(Profile.GPU_INTENSIVE, vram_mib=vram, min_compute_capability=cc, gpus=1)
                if any(fits(g, need, margin) for g in self.gate.known.values()):
                    self.subscribed.add(name)
                    if self.paused_queues:
                        self.paused_queues.append(name)
                    else:
                        self.consumer.add_task_queue(name)
                    log.info("consuming %s: this worker's GPUs can run what it holds", name)
        self.counters["ticks"] += 1

    def heartbeat(self) -> None:
        """From the heartbeat thread: registry, reservation refresh, dead workers' messages."""
        with self.lock:
            tags = list(self.tags.values())
            reservations = [run.admitted.reservation for run in self.reservations.values()]
        counters = dict(self.counters)
        deltas = {k: v - self._flushed[k] for k, v in counters.items() if k != "ticks"}
        with self.lock:
            runtimes, self.runtimes = self.runtimes, collections.Counter()
        state = self.state()
        self._announced_pool_size = state["pool"]["size"]
        self.registry.announce(self.record(), tags, state=state, counters=deltas, runtimes=runtimes)
        self._flushed.update(deltas)
        self.gate.ledger.refresh(reservations, self.gate.pools())
        from .admission import reclaim_dead_workers

        reclaim_dead_workers(self.consumer.app, self.registry, self.registry.client)

    def record(self) -> WorkerRecord:
        gpus = tuple(
            GpuRecord(g.uuid, g.index, g.name, g.memory_total_mib, g.compute_capability, g.healthy)
            for g in self.gate.known.values()
        )
        queues = tuple(q.name for q in self.consumer.task_consumer.queues) if self.consumer.task_consumer else ()
        return WorkerRecord(
            node=self.node,
            incarnation=self.incarnation,
            host=socket.gethostname(),
            queues=tuple(sorted(set(queues) | set(self.paused_queues))),
            gpus=gpus,
            cpu_threads=self.gate.cpu_threads,
            memory_total_mib=self.gate.memory_total_mib,
        )

    def shutdown(self) -> None:
        with self.lock:
            entries = list(self.reservations.values())
            self.reservations.clear()
        for run in entries:
            self.gate.ledger.release(run.admitted.reservation, run.admitted.pools)
        self.registry.stopped(self.record())

    # --- what operators see ---------------------------------------------------------

    def state(self) -> dict[str, Any]:
        pools = self.gate.pools()
        used = self.gate.ledger.used(pools)
        with self.lock:
            activity = {uuid: self.activity.of(uuid) for uuid in self.gate.known}
        gpus = [
            {
                "index": g.index,
                "uuid": g.uuid,
                "name": g.name,
                "memory_total_mib": g.memory_total_mib,
                "memory_reserved_mib": used.get(f"gpu:{g.uuid}", 0),
                "memory_free_observed_mib": g.memory_free_mib,
                "healthy": g.healthy,
                "utilization_percent": g.utilization_percent,
                "temperature_c": g.temperature_c,
                "power_w": g.power_w,
                **activity[g.uuid],
            }
            for g in self.gate.known.values()
        ]
        host = self.gate.host
        return {
            "node": self.node,
            "queues": list(self.record().queues),
            "assist": self.assist,
            "pool": {"implementation": type(self.consumer.pool).__module__.rsplit(".", 1)[-1],
                     "size": self.consumer.pool.num_processes, "history": list(self.pool_history)},
            "threads_per_task": int(os.environ.get("OMP_NUM_THREADS") or 1),
            "gpus": gpus,
            "host": {
                "cpu_threads": self.gate.cpu_threads,
                "cpu_threads_reserved": used.get(f"host:{host}:threads", 0),
                "memory_total_mib": self.gate.memory_total_mib,
                "memory_reserved_mib": used.get(f"host:{host}:memory", 0),
            },
            "paused": bool(self.paused_queues),
            "reasons": dict(self.reasons),
            "held": len(self.held),
            "running": len(self.reservations),
            "counters": dict(self.counters),
        }

    def _maybe_send_event(self) -> None:
        dispatcher = getattr(self.consumer, "event_dispatcher", None)
        if dispatcher is None:
            return
        summary = (bool(self.paused_queues), len(self.held), tuple(self.reasons))  # not per task: too chatty
        now = time.monotonic()
        if summary == self._last_state and now - self._last_event < EVENT_EVERY_S:
            return
        self._last_state, self._last_event = summary, now
        dispatcher.send("worker-taskmesh", taskmesh=self.state())


"""What operators see of one worker: its registry record, its full admission state
(``inspect stats``, the registry, ``status``), and ``worker-taskmesh`` events.

State goes to ``celery inspect stats`` (the bootstep's ``info``: the full state under
``taskmesh`` and a plain line per GPU under ``taskmesh_gpus``, which Flower's worker
page shows in its "Other" tab) and to ``worker-taskmesh`` events, which Celery sends
without ``-E`` because of the ``worker-`` prefix. Events go when the summary changes,
or every ``EVENT_EVERY_S``: not per task, which would be too chatty.
"""

from __future__ import annotations

import os
import socket
import time
from typing import Any

from taskmesh.core.headers import enqueued_at
from taskmesh.core.records import GpuRecord, WorkerRecord
from taskmesh.worker.controller import AdmissionController

EVENT_EVERY_S = 5.0


def held_since(c: AdmissionController) -> dict[str, float]:
    """Queue → the enqueue time of the oldest message in the held line (a copy: read off the loop)."""
    oldest: dict[str, float] = {}
    for held in tuple(c.held):
        queue = (held.message.delivery_info or {}).get("routing_key")
        stamp = enqueued_at(held.message.headers)
        if queue and stamp is not None:
            oldest[queue] = min(stamp, oldest.get(queue, stamp))
    return oldest


class Reporter:
    def __init__(self, controller: AdmissionController) -> None:
        self.controller = controller
        self.announced_pool_size: int | None = None
        self._last_event = 0.0
        self._last_state: Any = None

    def record(self) -> WorkerRecord:
        c = self.controller
        with c.lock:
            running = {uuid: bool(c.activity.of(uuid)["running"]) for uuid in c.gate.known}
        views = {uuid: c.warm.gpu_view(uuid, running[uuid]) for uuid in c.gate.known}
        gpus = tuple(
            GpuRecord(g.uuid, g.index, g.name, g.memory_total_mib, g.compute_capability, g.healthy,
                      state=views[g.uuid]["state"], models=tuple(views[g.uuid]["models"]))
            for g in c.gate.known.values()
        )
        return WorkerRecord(
            node=c.node,
            incarnation=c.incarnation,
            host=socket.gethostname(),
            queues=c.intake.consumed(),
            gpus=gpus,
            cpu_threads=c.gate.cpu_threads,
            memory_total_mib=c.gate.memory_total_mib,
        )

    def state(self) -> dict[str, Any]:
        c = self.controller
        gate = c.gate
        c.warm.read()  # what the pool processes hold now (loading, ready, busy), for the GPUs' state
        used = gate.ledger.used(gate.pools())
        with c.lock:
            activity = {uuid: c.activity.of(uuid) for uuid in gate.known}
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
                **c.warm.gpu_view(g.uuid, bool(activity[g.uuid]["running"])),
            }
            for g in gate.known.values()
        ]
        pool = c.consumer.pool
        return {
            "node": c.node,
            "queues": list(c.intake.consumed()),
            "assist": c.intake.assist,
            "pool": {"implementation": type(pool).__module__.rsplit(".", 1)[-1],
                     "size": pool.num_processes, "history": list(c.pool_history)},
            "threads_per_task": int(os.environ.get("OMP_NUM_THREADS") or 1),
            "gpus": gpus,
            "host": {
                "cpu_threads": gate.cpu_threads,
                "cpu_threads_reserved": used.get(f"host:{gate.host}:threads", 0),
                "memory_total_mib": gate.memory_total_mib,
                "memory_reserved_mib": used.get(f"host:{gate.host}:memory", 0),
            },
            "paused": c.intake.paused,
            "reasons": dict(c.reasons),
            "held": len(c.held),
            "held_since": held_since(c),
            "running": len(c.reservations),
            "counters": dict(c.counters),
        }

    def tick(self) -> None:
        """On the event loop, after the controller's tick: a resized pool is announced now, then events."""
        c = self.controller
        if c.consumer.pool.num_processes != self.announced_pool_size:
            c.changed.set()
        dispatcher = getattr(c.consumer, "event_dispatcher", None)
        if dispatcher is None:
            return
        summary = (c.intake.paused, len(c.held), tuple(c.reasons))
        now = time.monotonic()
        if summary == self._last_state and now - self._last_event < EVENT_EVERY_S:
            return
        self._last_state, self._last_event = summary, now
        dispatcher.send("worker-taskmesh", taskmesh=self.state())

"""What Prometheus scrapes: the fleet's state in Redis, read fresh at each scrape.

A custom collector rather than gauges set by a background loop: every number is read
from Redis when Prometheus asks, so a scrape is never staler than the state workers
announce, and an exporter that restarts has nothing to rebuild. The sources are the
ones the rest of taskmesh uses — ``depth.queue_depths`` (every priority sub-list, not a
bare ``LLEN``), the worker registry and the admission controllers' announced states,
the fleet counters, the rebalancer's alerts and runs — so a dashboard and
``celery inspect`` never disagree.

GPU series carry dcgm-exporter's names, units and labels, so dashboards written for
DCGM work against simulated GPUs and machines without dcgm-exporter. Telemetry a
provider does not have (a simulated GPU's temperature) is left out rather than
exported as 0, which would read as a real, cold, idle GPU.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable, Iterator
from typing import Any

import redis
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from taskmesh.core.config import load_config
from taskmesh.core.models import GPU_STATES
from taskmesh.core.nodes import group_of, host_of
from taskmesh.core.records import WorkerRecord
from taskmesh.observe.batch_metrics import batch_families
from taskmesh.state.client import state_client
from taskmesh.state.keys import ALERTS, COUNTERS
from taskmesh.state.keys import REBALANCE_RUNS as REBALANCE_RUNS
from taskmesh.state.models import ModelStore
from taskmesh.state.queues import app_queue_depths
from taskmesh.state.registry import Registry

log = logging.getLogger(__name__)

STATE_FRESH_WINDOWS = 3  # a worker silent this many registry alive windows (Redis's clock) reports nothing
GPU_LABELS = ("gpu", "UUID", "modelName", "Hostname")

# Fleet counters (``taskmesh:counters``) exported even before anything has counted them,
# so ``rate()`` and alerts see a 0 rather than no series.
KNOWN_COUNTERS = {
    "admitted": "Tasks admitted by a worker's admission controller",
    "waits": "Admission decisions that had to wait for memory or capacity",
    "held": "Messages a worker held back until they fit",
    "pauses": "Times a worker paused its intake",
    "rerouted": "Tasks a worker sent on to a queue of GPUs that can run them",
    "released": "Reservations released when a task ended",
    "requeued": "Held messages given back to the queue (for example on an unhealthy GPU)",
    "dead_lettered": "Tasks that failed for good and went to the dead-letter store",
    "duplicates_skipped": "Second deliveries of a once=True run that had finished, acknowledged and not run",
    "duplicates_parked": "Second deliveries of a once=True run still running elsewhere, kept until it ended",
    "queue_full": "Submissions refused with QueueFull (backpressure)",
    "infeasible": "Submissions no known hardware can ever run",
    "fallbacks": "Submissions sent to their fallback profile's queue",
    "rebalance_actions": "Actions the rebalancer took",
    "alerts_raised": "Alerts the rebalancer raised",
    "duplicates_detected": "Tasks delivered again while the worker presumed dead still ran them (may have run twice)",
    "refused": "Messages a worker refused unrun (a taskmesh header, id or body it cannot read); see dead letters",
    "unreadable": "Items on a worker's queues that were not kombu messages at all, dropped",
    "cache_hits": "Calls of a cache_ttl task answered from the cache, not sent",
    "cache_misses": "Calls of a cache_ttl task not in the cache, sent",
}

# Every family read at scrape time: name → (type, help, label names). ``describe()``
# hands it to prometheus_client; tests check it and EVENT_FED against a live scrape.
METRICS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "taskmesh_broker_up": ("gauge", "1 when the exporter could read the broker's Redis at this scrape", ()),
    "taskmesh_queue_waiting": ("gauge", "Messages waiting, over every priority sub-list", ("queue",)),
    "taskmesh_queue_waiting_by_priority": ("gauge", "Messages waiting per Redis priority step", ("queue", "priority")),
    "taskmesh_queue_in_flight": ("gauge", "Messages delivered to a worker and not yet acknowledged", ("queue",)),
    "taskmesh_queue_oldest_age_seconds": (
        "gauge", "Age of the oldest waiting message (0 when none waits; absent when unstamped)", ("queue",),
    ),
    "taskmesh_queue_consumers": ("gauge", "Live taskmesh workers consuming the queue (paused ones included)",
                                 ("queue",)),
    **{f"taskmesh_{name}": ("counter", text, ()) for name, text in KNOWN_COUNTERS.items()},
    "taskmesh_alert_active": ("gauge", "1 for each alert the rebalancer has active", ("name", "queue", "kind")),
    "taskmesh_rebalance_last_run_timestamp_seconds": ("gauge", "When the rebalancer last ran (unix time)", ()),
    "taskmesh_rebalance_desired_replicas": ("gauge", "Replicas per worker group the rebalancer last asked for",
                                            ("group",)),
    "taskmesh_worker_up": ("gauge", "1 for a live worker, 0 for one seen recently that is gone", ("group", "node")),
    "taskmesh_worker_paused": ("gauge", "1 when the worker has paused its intake", ("node",)),
    "taskmesh_worker_held": ("gauge", "Messages the worker holds until they fit", ("node",)),
    "DCGM_FI_DEV_FB_TOTAL": ("gauge", "Framebuffer memory total (in MiB)", GPU_LABELS),
    "DCGM_FI_DEV_FB_USED": ("gauge", "Framebuffer memory used (in MiB), as the driver sees it", GPU_LABELS),
    "DCGM_FI_DEV_FB_FREE": ("gauge", "Framebuffer memory free (in MiB), as the driver sees it", GPU_LABELS),
    "DCGM_FI_DEV_GPU_UTIL": ("gauge", "GPU utilization (in %)", GPU_LABELS),
    "DCGM_FI_DEV_GPU_TEMP": ("gauge", "GPU temperature (in C)", GPU_LABELS),
    "DCGM_FI_DEV_POWER_USAGE": ("gauge", "Power draw (in W)", GPU_LABELS),
    "taskmesh_gpu_memory_reserved_mib": ("gauge", "GPU memory reserved by admitted tasks (in MiB)", GPU_LABELS),
    "taskmesh_gpu_healthy": ("gauge", "1 when the GPU is healthy (no Xid error, not failed)", GPU_LABELS),
    "taskmesh_gpu_running_tasks": ("gauge", "Tasks running on the GPU", GPU_LABELS),
    "taskmesh_gpu_state": ("gauge", "1 for the GPU's warm-model state (idle, loading, ready, busy, unloading)",
                           (*GPU_LABELS, "state")),
    "taskmesh_model_loaded": ("gauge", "1 for each model warm on the GPU", (*GPU_LABELS, "model")),
    "taskmesh_model_loads": ("counter", "Model loads done by the fleet", ("model",)),
    "taskmesh_model_load_seconds": ("counter", "Time the fleet spent loading the model", ("model",)),
    "taskmesh_model_load_time_seconds": ("gauge", "The model's learned load time (moving average)", ("model",)),
}
# Series that exist once a declared model has been loaded somewhere (none in a fleet without models).
MODEL_SERIES = ("taskmesh_model_loaded", "taskmesh_model_loads", "taskmesh_model_load_seconds",
                "taskmesh_model_load_time_seconds")
# Fed by Celery events in ``exporter.TaskTimings``, not read at scrape time.
EVENT_FED: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "taskmesh_task_runtime_seconds": ("histogram", "Task run time, from started to finished", ("task", "queue")),
    "taskmesh_task_queue_wait_seconds": (
        "histogram", "Time from sent to started: waiting in the queue and held for admission", ("task", "queue"),
    ),
    "taskmesh_exporter_events": ("counter", "Celery events the exporter received (any type)", ()),
}
TELEMETRY = {  # DCGM name → key in a worker's GPU state; left out when the provider has no value
    "DCGM_FI_DEV_GPU_UTIL": "utilization_percent",
    "DCGM_FI_DEV_GPU_TEMP": "temperature_c",
    "DCGM_FI_DEV_POWER_USAGE": "power_w",
}


def family(name: str) -> Metric:
    """An empty family of one of ``METRICS``; the label names come from the table."""
    kind, text, labels = METRICS[name]
    metric_class = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
    return metric_class(name, text, labels=list(labels))


class TaskmeshCollector:
    """A prometheus_client collector over one app's broker."""

    def __init__(self, app: Any, client: redis.Redis | None = None) -> None:
        self.app = app
        self.client = client if client is not None else state_client(app)
        admission = (getattr(app, "taskmesh_config", None) or load_config()).admission
        self.registry = Registry(self.client, alive_s=admission.reservation_ttl_s,
                                 memory_s=admission.registry_memory_s)

    def describe(self) -> Iterable[Metric]:
        return [family(name) for name in METRICS]

    def collect(self) -> Iterator[Metric]:
        up = family("taskmesh_broker_up")
        try:
            families = self.families()  # all read before any is yielded: no half scrape
        except redis.RedisError as exc:
            log.warning("scrape: cannot read the broker's Redis (%s); exporting taskmesh_broker_up 0", exc)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        yield from families

    def families(self) -> list[Metric]:
        workers = self.registry.workers()
        alive = [r for r in workers if self.registry.is_alive(r)]
        window = STATE_FRESH_WINDOWS * self.registry.alive_s
        fresh = {r.node for r in workers if r.lease_age_s is not None and r.lease_age_s <= window}
        states = {node: s for node, s in self.registry.states().items() if node in fresh}
        return [
            *self.queue_families(alive),
            *self.counter_families(),
            *self.rebalancer_families(),
            *self.worker_families(workers, alive, states),
            *self.gpu_families(workers, states),
            *self.model_families(),
            *batch_families(self.client),
        ]

    def queue_families(self, alive: list[WorkerRecord]) -> list[Metric]:
        declared = [q.name for q in self.app.conf.task_queues or ()]
        consumed = sorted({q for r in alive for q in r.queues})
        names = list(dict.fromkeys([*declared, *sorted(self.registry.need_queues()), *consumed]))
        depths = app_queue_depths(self.app, names)
        waiting, in_flight, age, consumers = (family(f"taskmesh_queue_{n}") for n in
                                              ("waiting", "in_flight", "oldest_age_seconds", "consumers"))
        by_priority = family("taskmesh_queue_waiting_by_priority")
        for name, depth in depths.items():
            waiting.add_metric([name], depth.waiting)
            in_flight.add_metric([name], depth.in_flight)
            if depth.oldest_age_s is not None or not depth.waiting:
                age.add_metric([name], depth.oldest_age_s or 0.0)
            for step, count in sorted(depth.by_priority.items()):
                by_priority.add_metric([name, str(step)], count)
            consumers.add_metric([name], sum(1 for r in alive if name in r.queues))
        return [waiting, by_priority, in_flight, age, consumers]

    def counter_families(self) -> Iterator[Metric]:
        counts = {name: 0 for name in KNOWN_COUNTERS}
        counts.update(self.registry.counters())
        counts.pop("ticks", None)
        for name, value in sorted(counts.items()):
            metric_name = "taskmesh_" + re.sub(r"[^a-zA-Z0-9_]", "_", name)
            known = METRICS.get(metric_name)
            counter = CounterMetricFamily(metric_name, known[1] if known else f"Fleet counter {name!r} in {COUNTERS}")
            counter.add_metric([], value)
            yield counter

    def rebalancer_families(self) -> Iterator[Metric]:
        active = family("taskmesh_alert_active")
        for key, raw in sorted(self.client.hgetall(ALERTS).items()):
            alert = _json_object(raw, f"{ALERTS} {key!r}")
            if alert is not None:
                active.add_metric([str(alert.get("name") or key.decode()), str(alert.get("queue") or ""),
                                   str(alert.get("kind") or "")], 1)
        yield active
        last = _json_object(self.client.lindex(REBALANCE_RUNS, 0), f"{REBALANCE_RUNS}[0]")
        last_run = family("taskmesh_rebalance_last_run_timestamp_seconds")
        replicas = family("taskmesh_rebalance_desired_replicas")
        if last is not None:
            if isinstance(last.get("at"), int | float):
                last_run.add_metric([], last["at"])
            for group, count in sorted((last.get("hints") or {}).items()):
                if isinstance(count, int | float):
                    replicas.add_metric([str(group)], count)
        yield last_run
        yield replicas

    def worker_families(self, workers: list[WorkerRecord], alive: list[WorkerRecord],
                        states: dict[str, dict[str, Any]]) -> list[Metric]:
        up = family("taskmesh_worker_up")
        live_nodes = {r.node for r in alive}
        for node in sorted({r.node for r in workers}):
            up.add_metric([group_of(node), node], 1 if node in live_nodes else 0)
        paused, held = family("taskmesh_worker_paused"), family("taskmesh_worker_held")
        for node, state in sorted(states.items()):
            paused.add_metric([node], 1 if state.get("paused") else 0)
            held.add_metric([node], state.get("held") or 0)
        return [up, paused, held]

    def gpu_families(self, workers: list[WorkerRecord], states: dict[str, dict[str, Any]]) -> list[Metric]:
        """One series per GPU UUID, although several workers (a GPU's own, ``mixed``) may report it.

        Memory and health come from the freshest report (the ledger and the driver are
        shared, so any report has them); running tasks are added up over the reports.
        """
        hosts = {r.node: r.host for r in sorted(workers, key=lambda r: r.last_seen)}
        gpus: dict[str, tuple[dict[str, Any], str]] = {}
        running: dict[str, int] = {}
        for node, state in sorted(states.items(), key=lambda item: item[1].get("updated", 0)):
            for gpu in state.get("gpus") or ():
                gpus[gpu["uuid"]] = (gpu, hosts.get(node) or host_of(node))
                running[gpu["uuid"]] = running.get(gpu["uuid"], 0) + len(gpu.get("running") or ())
        out = {name: family(name) for name, (_, _, labels) in METRICS.items() if labels == GPU_LABELS}
        for uuid, (gpu, host) in sorted(gpus.items(), key=lambda item: (item[1][1], item[1][0]["index"])):
            labels = [str(gpu["index"]), uuid, str(gpu.get("name") or ""), host]
            total, free = gpu.get("memory_total_mib"), gpu.get("memory_free_observed_mib")
            out["DCGM_FI_DEV_FB_TOTAL"].add_metric(labels, total)
            if free is not None:
                out["DCGM_FI_DEV_FB_FREE"].add_metric(labels, free)
                out["DCGM_FI_DEV_FB_USED"].add_metric(labels, max(0, total - free))
            for name, key in TELEMETRY.items():
                if gpu.get(key) is not None:
                    out[name].add_metric(labels, gpu[key])
            out["taskmesh_gpu_memory_reserved_mib"].add_metric(labels, gpu.get("memory_reserved_mib") or 0)
            out["taskmesh_gpu_healthy"].add_metric(labels, 1 if gpu.get("healthy", True) else 0)
            out["taskmesh_gpu_running_tasks"].add_metric(labels, running[uuid])
        out["taskmesh_gpu_state"], out["taskmesh_model_loaded"] = family("taskmesh_gpu_state"), family(
            "taskmesh_model_loaded")
        for uuid, (gpu, host) in sorted(gpus.items(), key=lambda item: (item[1][1], item[1][0]["index"])):
            labels = [str(gpu["index"]), uuid, str(gpu.get("name") or ""), host]
            current = gpu.get("state") or ("busy" if running[uuid] else "idle")
            for state in GPU_STATES:
                out["taskmesh_gpu_state"].add_metric([*labels, state], 1 if state == current else 0)
            for model in gpu.get("models") or ():
                out["taskmesh_model_loaded"].add_metric([*labels, model], 1)
        return list(out.values())

    def model_families(self) -> list[Metric]:
        store = ModelStore(self.client)
        loads, seconds, learned = (family(f"taskmesh_model_{n}")
                                   for n in ("loads", "load_seconds", "load_time_seconds"))
        for model, done in sorted(store.loads().items()):
            loads.add_metric([model], done.get("count", 0))
            seconds.add_metric([model], done.get("seconds", 0.0))
        for model, value in sorted(store.learned().items()):
            learned.add_metric([model], value)
        return [loads, seconds, learned]


def _json_object(raw: Any, where: str) -> dict[str, Any] | None:
    """A JSON object read from Redis, or None (logged) when absent or malformed."""
    if raw is None:
        return None
    try:
        value = json.loads(raw)
    except ValueError:
        value = None
    if not isinstance(value, dict):
        log.warning("scrape: ignoring %s: not a JSON object", where)
        return None
    return value

"""``collect_status``: the whole fleet as one JSON-safe dict, for ``taskmesh status`` and ``taskmesh top``.

Everything comes from Redis, as the workers, producers and the rebalancer left it: the
worker registry and each worker's admission state (announced every couple of seconds),
fleet counters, task progress, alerts and rebalance runs, all read in one pipelined
round trip, then queue depths (``depth.app_queue_depths``: one more, plus the scan of
kombu's unacked hash). Nothing is asked of the workers themselves, so a status costs the
same with 2 workers or 200, and works while a worker is busy or gone.

The rebalancer's keys are read if present: ``taskmesh:rebalance:runs`` (a list, newest
first, each ``{"at", "acted", "skipped", "depths", "decisions", "hints"}``) and
``taskmesh:alerts`` (alert name → ``{"name", "queue", "kind", "message", "since"}``).
"""

from __future__ import annotations

import json
import time
from typing import Any

from taskmesh.app.batch_jobs import recent_batches
from taskmesh.app.progress import eta_s
from taskmesh.core.nodes import group_of, kind_of
from taskmesh.core.records import WorkerRecord
from taskmesh.state.batches import batch_stats
from taskmesh.state.exclusive import ExclusiveBatches
from taskmesh.state.keys import ALERTS, COUNTERS, NEED_QUEUES, PROGRESS, STATES
from taskmesh.state.keys import REBALANCE_RUNS as REBALANCE_RUNS
from taskmesh.state.models import ModelStore
from taskmesh.state.queues import app_queue_depths
from taskmesh.state.registry import Registry

RECENT_RUNS = 5
COUNTER_NAMES = (
    "admitted", "waits", "held", "pauses", "rerouted", "released", "requeued", "duplicates_skipped",
    "dead_lettered", "duplicates_detected", "queue_full", "infeasible", "fallbacks", "rebalance_actions",
    "alerts_raised", "refused", "unreadable",
)


def collect_status(app: Any, now: float | None = None) -> dict[str, Any]:
    """Queues, workers, worker groups, GPUs, task progress, alerts, rebalance runs and counters."""
    client = app.redis()
    now = time.time() if now is None else now
    with client.pipeline(transaction=False) as pipe:
        pipe.hgetall(STATES)
        pipe.hgetall(COUNTERS)
        pipe.hgetall(NEED_QUEUES)
        pipe.hgetall(PROGRESS)
        pipe.hgetall(ALERTS)
        pipe.lrange(REBALANCE_RUNS, 0, -1)
        raw_states, raw_counters, raw_need, raw_progress, raw_alerts, raw_runs = pipe.execute()

    admission = app.taskmesh_config.admission
    registry = Registry(client, alive_s=admission.reservation_ttl_s, memory_s=admission.registry_memory_s)
    records = _latest_per_node(registry.workers())
    alive = {node for node, record in records.items() if registry.is_alive(record)}
    states = {_text(node): _json(raw) or {} for node, raw in raw_states.items()}
    progress = {_text(tid): entry for tid, raw in raw_progress.items() if isinstance(entry := _json(raw), dict)}
    runs = [run for raw in raw_runs if isinstance(run := _json(raw), dict)]
    hints = (runs[0].get("hints") or {}) if runs else {}

    workers = [_worker(records[node], states.get(node, {}), node in alive, now) for node in sorted(records)]
    queue_names = [q.name for q in app.conf.task_queues or ()]
    queue_names += sorted(_text(name) for name in raw_need)
    queue_names += sorted(q for node in alive for q in records[node].queues)
    depths = app_queue_depths(app, dict.fromkeys(queue_names))
    queues = [
        {
            "name": depth.queue,
            "waiting": depth.waiting,
            "in_flight": depth.in_flight,
            "oldest_age_s": depth.oldest_age_s,
            "by_priority": {str(step): count for step, count in depth.by_priority.items()},
            "consumers": sum(1 for node in alive if depth.queue in records[node].queues),
        }
        for depth in depths.values()
    ]
    return {
        "at": now,
        "queues": queues,
        "workers": workers,
        "groups": _groups(workers, hints),
        "gpus": _gpus(records, states, alive, progress, now),
        "progress": [
            {"id": tid, "task": entry.get("task"), "worker": entry.get("worker"), **_progress_fields(entry, now)}
            for tid, entry in sorted(progress.items())
            if entry.get("worker") in alive  # a dead worker's entry waits for its task to run again
        ],
        "alerts": sorted(_alerts(raw_alerts), key=lambda a: (_number(a["since"]), a["name"])),
        "rebalance": {
            "runs": runs[:RECENT_RUNS],
            "last_action": next((run for run in runs if run.get("acted")), None),
            "hints": hints,
        },
        "counters": {**dict.fromkeys(COUNTER_NAMES, 0), **{_text(k): int(v) for k, v in raw_counters.items()}},
        "models": ModelStore(client).summary(),
        "batches": _batches(batch_stats(client)),
        "batch_jobs": recent_batches(app),
        "mode": {"exclusive": ExclusiveBatches(client).current()},
    }


def _batches(stats: dict[str, dict[str, float]]) -> dict[str, dict[str, Any]]:
    """Per batch task, since its first batch: calls, items, and the means top shows."""
    out = {}
    for task, seen in sorted(stats.items()):
        calls = seen.get("calls", 0)
        if not calls:
            continue
        out[task] = {"calls": int(calls), "items": int(seen.get("items", 0)),
                     "mean_size": round(seen.get("items", 0) / calls, 1),
                     "mean_fill_wait_s": round(seen.get("fill_seconds", 0) / calls, 3),
                     "items_per_s": round(seen["items"] / seen["seconds"], 1) if seen.get("seconds") else None}
    return out


def _latest_per_node(records: Any) -> dict[str, WorkerRecord]:
    """A restarted worker leaves its old incarnation in the registry; the newest one counts."""
    latest: dict[str, WorkerRecord] = {}
    for record in records:
        if record.node not in latest or record.last_seen > latest[record.node].last_seen:
            latest[record.node] = record
    return latest


def _worker(record: WorkerRecord, state: dict[str, Any], alive: bool, now: float) -> dict[str, Any]:
    # What a worker that is gone last announced is history, not what it runs or holds now.
    return {
        "node": record.node,
        "group": group_of(record.node),
        "host": record.host,
        "alive": alive,
        "stopped": record.stopped,
        "seen_s_ago": max(0.0, now - record.last_seen if record.lease_age_s is None else record.lease_age_s),
        "queues": list(record.queues),
        "gpus": [gpu.uuid for gpu in record.gpus],
        "paused": bool(state.get("paused")) if alive else False,
        "reasons": dict(state.get("reasons") or {}) if alive else {},
        "held": int(state.get("held") or 0) if alive else 0,
        "running": int(state.get("running") or 0) if alive else 0,
    }


def _groups(workers: list[dict[str, Any]], hints: dict[str, Any]) -> list[dict[str, Any]]:
    groups: dict[str, dict[str, Any]] = {}
    for worker in workers:
        group = groups.setdefault(worker["group"], {
            "group": worker["group"], "workers": 0, "alive": 0, "paused": 0, "running": 0, "held": 0, "queues": [],
        })
        group["workers"] += 1
        group["alive"] += worker["alive"]
        group["paused"] += worker["paused"]
        group["running"] += worker["running"]
        group["held"] += worker["held"]
        group["queues"] = sorted(set(group["queues"]) | set(worker["queues"]))
    kinds = {kind_of(name) for name in groups}
    for name in hints:  # a hint is per kind (gpu, cpu, ...): show a group only for a kind with none live
        if name in kinds:
            continue
        groups.setdefault(name, {
            "group": name, "workers": 0, "alive": 0, "paused": 0, "running": 0, "held": 0, "queues": [],
        })
    return [{**group, "desired": hints.get(name)} for name, group in sorted(groups.items())]


def _gpus(
    records: dict[str, WorkerRecord],
    states: dict[str, dict[str, Any]],
    alive: set[str],
    progress: dict[str, dict[str, Any]],
    now: float,
) -> list[dict[str, Any]]:
    """One entry per GPU UUID, merged over the live workers that see it (``gpuN`` and ``mixed``).

    Its state is ``unhealthy`` (NVML or the simulation says so), else ``busy`` (runs a task),
    else ``paused`` (every worker that sees it has stopped taking work, with reasons), else
    ``idle``.
    """
    gpus: dict[str, dict[str, Any]] = {}
    for node in sorted(alive):
        state = states.get(node, {})
        for seen in state.get("gpus") or ():
            tasks = [_running_task(t, progress.get(t["id"]), now) for t in seen.get("running") or ()]
            gpu = gpus.get(seen["uuid"])
            if gpu is None:
                gpus[seen["uuid"]] = {
                    "uuid": seen["uuid"],
                    "node": node,
                    "workers": [node],
                    "host": records[node].host,
                    "index": seen["index"],
                    "model": seen.get("name"),
                    "healthy": bool(seen.get("healthy", True)),
                    "paused": bool(state.get("paused")),
                    "reasons": dict(state.get("reasons") or {}),
                    "memory_total_mib": seen.get("memory_total_mib"),
                    "memory_reserved_mib": seen.get("memory_reserved_mib"),
                    "memory_free_mib": seen.get("memory_free_observed_mib"),
                    "utilization_percent": seen.get("utilization_percent"),
                    "temperature_c": seen.get("temperature_c"),
                    "tasks": tasks,
                    "tasks_done": int(seen.get("tasks_done") or 0),
                    "idle_since": seen.get("idle_since"),
                    "model_state": seen.get("state", "busy" if tasks else "idle"),  # warm models (core.models)
                    "models": list(seen.get("models") or ()),
                    "model_tasks": int(seen.get("model_tasks") or 0),
                    "model_last_used": seen.get("model_last_used"),
                }
                continue
            gpu["workers"].append(node)
            gpu["healthy"] = gpu["healthy"] and bool(seen.get("healthy", True))
            gpu["paused"] = gpu["paused"] and bool(state.get("paused"))  # paused only if no worker takes work
            gpu["reasons"].update(state.get("reasons") or {})
            gpu["tasks"] += tasks
            gpu["tasks_done"] += int(seen.get("tasks_done") or 0)
            gpu["idle_since"] = max(filter(None, (gpu["idle_since"], seen.get("idle_since"))), default=None)
    out = []
    for gpu in sorted(gpus.values(), key=lambda g: (g["host"], g["index"], g["uuid"])):
        state = (
            "unhealthy" if not gpu["healthy"]
            else "busy" if gpu["tasks"]
            else "paused" if gpu["paused"]
            else "idle"
        )
        idle_since = gpu.pop("idle_since")
        idle_s = max(0.0, now - idle_since) if state == "idle" and idle_since else None
        out.append({**gpu, "state": state, "idle_s": idle_s})
    return out


def _running_task(running: dict[str, Any], entry: dict[str, Any] | None, now: float) -> dict[str, Any]:
    task = {"id": running["id"], "task": running.get("task"), "started": running.get("started")}
    return {**task, **(_progress_fields(entry, now) if entry else {"progress": None, "eta_s": None})}


def _progress_fields(entry: dict[str, Any], now: float) -> dict[str, Any]:
    done, total = entry.get("done", 0), entry.get("total", 0)
    return {
        "progress": {
            "done": done,
            "total": total,
            "percent": round(100.0 * done / total, 1) if total else None,
            "started": entry.get("started"),
            "updated": entry.get("updated"),
        },
        "eta_s": eta_s(entry, now),
    }


def _alerts(raw_alerts: dict[Any, Any]) -> list[dict[str, Any]]:
    alerts = []
    for name, raw in raw_alerts.items():
        alert = _json(raw)
        if not isinstance(alert, dict):
            alert = {"kind": "unreadable", "message": _text(raw)}
        alerts.append({"name": _text(name), "queue": None, "kind": None, "message": "", "since": None, **alert})
    return alerts


def _number(value: Any) -> float:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else 0.0


def _json(raw: Any) -> Any:
    """Parsed JSON, or None: one malformed entry must not take the whole status down."""
    try:
        return json.loads(raw)
    except (ValueError, TypeError):
        return None


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)

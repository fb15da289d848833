"""``taskmesh.rebalance``: the beat task that looks at the whole system and moves capacity.

Each run reads queue depths (every priority sub-list, in flight, oldest age), the
worker registry and learned run times (per task, over a sample of what waits next in
each queue, so a queue whose backlog is one slow kind is not judged by its fast ones);
asks ``rebalance_policy`` what to do; does
it with Celery's remote control (``taskmesh_resize``, which does what ``pool_grow``/
``pool_shrink`` do and timestamps the change, and ``taskmesh_assist`` for mixed
workers' consumers); moves waiting tasks that declare
a fallback out of a saturated queue with an atomic Redis move; raises and clears
alerts; and records what it saw, decided and why for ``taskmesh status``.

A Redis lock makes a second beat started by mistake harmless: the run that does not
get the lock records that it did nothing, and why. The task runs on the ``cpu_light``
queue at CRITICAL priority, on gevent, which stays responsive while it waits for
control replies.
"""

from __future__ import annotations

import json
import logging
import socket
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from taskmesh.core.need_queues import family
from taskmesh.core.nodes import worker_group
from taskmesh.core.profiles import QUEUES, Profile
from taskmesh.core.rebalance_policy import (
    Decision,
    QueueView,
    WorkerView,
    alerts,
    assist_moves,
    pool_sizes,
    saturated,
    scaling_hints,
)
from taskmesh.core.records import WorkerRecord
from taskmesh.state.client import lua
from taskmesh.state.keys import ALERTS, REBALANCE_LOCK, REBALANCE_RESIZED, REBALANCE_RUNS, layout
from taskmesh.state.queues import QueueDepth, app_queue_depths, move_fallbacks, next_tasks
from taskmesh.state.registry import Registry

log = logging.getLogger(__name__)
KEEP_RUNS = 50
SAMPLE = 64  # messages read per waiting queue to learn what its backlog is made of
TASK_NAME = "taskmesh.rebalance"

def rebalance(app: Any) -> dict[str, Any]:
    """One run; returns (and records) what it saw and did."""
    client = app.redis()
    config = app.taskmesh_config
    token = uuid.uuid4().hex
    ttl_ms = int(max(1.0, config.rebalance.interval_s * 3) * 1000)
    if not client.set(REBALANCE_LOCK, token, nx=True, px=ttl_ms):
        run = {"at": time.time(), "acted": False, "skipped": "another rebalance run holds the lock",
               "depths": {}, "decisions": [], "hints": {}}
        _record(client, run)
        return run
    try:
        return _run(app, client, config, started=time.time())
    finally:
        client.eval(lua("release_lock"), 1, REBALANCE_LOCK, token)


def _run(app: Any, client: Any, config: Any, started: float) -> dict[str, Any]:
    registry = Registry(client, alive_s=config.admission.reservation_ttl_s,
                        memory_s=config.admission.registry_memory_s)
    records = registry.workers()
    alive = [r for r in records if registry.is_alive(r)]
    states = registry.states()
    workers = [worker_view(r, states.get(r.node, {})) for r in alive]
    names = list(QUEUES) + sorted(registry.need_queues())
    depths = app_queue_depths(app, names, client=client)
    queues = queue_views(depths, expected_runtimes(app, client, registry, depths), workers)
    resized = {k.decode(): float(v) for k, v in client.hgetall(REBALANCE_RESIZED).items()}
    # A pool resized since its worker last announced is not known yet: leave its whole host alone
    # this run, since the thread budget is shared by every pool on the host.
    unsettled = {w.host for w in workers if states.get(w.node, {}).get("updated", 0) <= resized.get(w.node, 0)}
    settled = [w for w in workers if w.host not in unsettled]
    decisions = assist_moves(queues, workers, config) + pool_sizes(queues, settled, config)
    decisions += _reroutes(app, client, queues, workers, config)
    found = alerts(queues, workers, config, groups_seen(records, states))
    _act(app, client, decisions)
    raised = _update_alerts(app, client, found)
    if decisions:
        registry.count("rebalance_actions", len(decisions))
    if raised:
        registry.count("alerts_raised", raised)
    run = {
        "started_at": started,  # holding the lock from here to "at"
        "at": time.time(),
        "acted": True,
        "skipped": None,
        "depths": {q.name: {"waiting": q.waiting, "in_flight": q.in_flight, "oldest_age_s": q.oldest_age_s,
                            "consumers": q.consumers, "expected_work_s": round(q.expected_work_s, 2)}
                   for q in queues.values()},
        "decisions": [_as_dict(d) for d in decisions + found],
        "hints": scaling_hints(queues, workers, config),
    }
    _record(client, run)
    return run


def expected_runtimes(app: Any, client: Any, registry: Registry, depths: Mapping[str, QueueDepth]) -> dict[str, float]:
    """Mean run time of what waits in each queue: the learned mean of each task among the
    next ``SAMPLE`` out, weighted by how often it appears; the queue's own mean for a task
    never seen run, and for a queue with nothing waiting."""
    means = registry.mean_runtimes()
    expected = {key[len("q:"):]: mean for key, mean in means.items() if key.startswith("q:")}
    keys = layout(app)
    for name, depth in depths.items():
        if not depth.waiting:
            continue
        sample = [(means.get(f"t:{task}", expected.get(name)), count)
                  for task, count in next_tasks(client, name, SAMPLE, **keys).items()]
        known = [(mean, count) for mean, count in sample if mean is not None]
        if known:
            expected[name] = sum(mean * count for mean, count in known) / sum(count for _, count in known)
    return expected


# --- what the policy sees: pure, so the fleet simulator builds the same views from its own state ---


def worker_view(record: WorkerRecord, state: Mapping[str, Any]) -> WorkerView:
    """A worker as the policy sees it: its registry record and the state its controller announced."""
    pool = state.get("pool", {})
    queues = own_queues(record, state)
    return WorkerView(
        node=record.node,
        group=worker_group(record.node, queues),
        host=record.host,
        queues=queues,
        assist=state.get("assist"),
        pool={"prefork": "prefork", "gevent": "gevent", "thread": "threads"}.get(pool.get("implementation"), "other"),
        pool_size=int(pool.get("size") or 1),
        threads_per_task=int(state.get("threads_per_task") or 1),
        cpu_threads=record.cpu_threads,
        unhealthy_gpus=tuple(f"GPU {g.index} ({g.uuid})" for g in record.gpus if not g.healthy),
        held=int(state.get("held") or 0),
        running=int(state.get("running") or 0),
        paused=bool(state.get("paused")),
        has_gpus=bool(record.gpus),
        no_gpu=(state.get("reasons") or {}).get("no_gpu"),
    )


def queue_views(depths: Mapping[str, QueueDepth], runtimes: Mapping[str, float],
                workers: Sequence[WorkerView]) -> dict[str, QueueView]:
    """Each queue's depth, learned mean run time and the workers serving it."""
    views = {}
    for name, depth in depths.items():
        serving = [w for w in workers if name in w.queues or w.assist == name]
        views[name] = QueueView(
            name=name,
            waiting=depth.waiting,
            in_flight=depth.in_flight,
            oldest_age_s=depth.oldest_age_s,
            mean_runtime_s=runtimes.get(name),
            consumers=len(serving),
            capacity=sum(w.pool_size for w in serving),
        )
    return views


def own_queues(record: WorkerRecord, state: Mapping[str, Any]) -> tuple[str, ...]:
    """The queues a worker consumes, less the one the rebalancer pointed it at."""
    return tuple(q for q in record.queues if q != state.get("assist"))


def groups_seen(records: Iterable[WorkerRecord], states: Mapping[str, Mapping[str, Any]] | None = None) -> list[str]:
    """Worker groups (``gpu0``, ``cpu``, ...) of workers not stopped cleanly: one missing from the
    live ones is down. A hand-named worker's group comes from its queues, as in ``worker_view``."""
    states = states or {}
    return sorted({worker_group(r.node, own_queues(r, states.get(r.node, {}))) for r in records if not r.stopped})


def _reroutes(app: Any, client: Any, queues: dict[str, QueueView], workers: list[WorkerView],
              config: Any) -> list[Decision]:
    """Move waiting tasks that allow a fallback out of a GPU queue no GPU can serve now."""
    decisions = []
    for view in queues.values():
        if family(view.name) != "gpu" or not saturated(view, workers, config.queue("gpu").fallback_depth):
            continue
        for fallback in (p.queue for p in Profile if p is not Profile.GPU_INTENSIVE):
            target = queues.get(fallback)
            if target is None or not target.consumers:
                continue
            moved = move_fallbacks(app, client, view.name, fallback, view.waiting - config.queue("gpu").fallback_depth)
            if moved:
                decisions.append(Decision("reroute", fallback, f"{view.name} saturated: {view.waiting} waiting, "
                                          "no GPU worker has room", amount=moved, queue=view.name))
    return decisions


def _act(app: Any, client: Any, decisions: list[Decision]) -> None:
    """Carry decisions out; a host's grows wait for its shrinks, and are dropped if one failed."""
    control = app.control
    failed_hosts = set()
    for decision in sorted(decisions, key=lambda d: d.action != "shrink"):
        destination = [decision.target]
        if decision.action == "move_consumer":
            control.broadcast("taskmesh_assist", arguments={"queue": decision.queue or ""},
                              destination=destination, reply=False)
        elif decision.action in ("shrink", "grow"):
            if decision.action == "grow" and decision.host in failed_hosts:
                log.info("rebalance: not growing %s: a shrink on %s failed", decision.target, decision.host)
                continue
            delta = decision.amount if decision.action == "grow" else -decision.amount
            replies = control.broadcast("taskmesh_resize", arguments={"n": delta}, destination=destination,
                                        reply=True, timeout=2) or []
            if not replies or any("error" in r.get(decision.target, {}) for r in replies):
                failed_hosts.add(decision.host)
            client.hset(REBALANCE_RESIZED, decision.target, time.time())
        if decision.action != "reroute":
            log.info("rebalance: %s %s %s (%s)", decision.action, decision.target, decision.queue or decision.amount,
                     decision.why)


def _update_alerts(app: Any, client: Any, found: list[Decision]) -> int:
    """Keep ``taskmesh:alerts`` equal to what is wrong now; log and announce the new ones."""
    current = {k.decode(): json.loads(v) for k, v in client.hgetall(ALERTS).items()}
    now_names = {d.target for d in found}
    raised = 0
    for decision in found:
        if decision.target in current:
            continue
        alert = {"name": decision.target, "queue": decision.queue, "kind": decision.kind,
                 "message": decision.why, "since": time.time()}
        client.hset(ALERTS, decision.target, json.dumps(alert))
        raised += 1
        log.warning("taskmesh alert %s: %s", decision.target, decision.why)
        with app.events.default_dispatcher(hostname=f"rebalancer@{socket.gethostname()}") as dispatcher:
            dispatcher.send("worker-taskmesh-alert", alert=alert)
    cleared = [name for name in current if name not in now_names]
    if cleared:
        client.hdel(ALERTS, *cleared)
        log.info("taskmesh alerts cleared: %s", ", ".join(cleared))
    return raised


def _record(client: Any, run: dict[str, Any]) -> None:
    pipe = client.pipeline()
    pipe.lpush(REBALANCE_RUNS, json.dumps(run))
    pipe.ltrim(REBALANCE_RUNS, 0, KEEP_RUNS - 1)
    pipe.execute()


def _as_dict(decision: Decision) -> dict[str, Any]:
    return {k: v for k, v in vars(decision).items() if v not in (None, 0) or k in ("action", "target", "why")}

"""What the rebalancer decides, as pure functions of what it saw.

No Redis and no Celery here, so the same policy drives the live rebalancer, the
tests that pin its behaviour, and the fleet simulator. Inputs are snapshots
(``QueueView``, ``WorkerView``); outputs are ``Decision`` values the glue in
``rebalance.py`` carries out and records.

The currency is *expected work*: tasks waiting × their learned mean run time.
A thousand 10 ms tasks are less backlog than ten 60 s transcriptions, and a queue
depth alone would move capacity the wrong way.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence

from taskmesh.core.config import Config
from taskmesh.core.need_queues import family
from taskmesh.core.nodes import kinds_of
from taskmesh.core.profiles import Profile

DEFAULT_RUNTIME_S = 1.0  # expected run time of a queue's tasks before any was observed
MIXED_CAN_SERVE = ("gpu", "cpu_intensive", "cpu_light")
GEVENT_GROWTH = 4  # a gevent pool may grow to this many times its configured size


@dataclasses.dataclass(frozen=True)
class QueueView:
    name: str
    waiting: int
    in_flight: int
    oldest_age_s: float | None
    mean_runtime_s: float | None
    consumers: int
    capacity: int  # task slots of the workers consuming it

    @property
    def expected_work_s(self) -> float:
        return self.waiting * (self.mean_runtime_s or DEFAULT_RUNTIME_S)

    @property
    def drain_s(self) -> float:
        """How long what waits takes with the slots serving it now."""
        return self.expected_work_s / max(1, self.capacity)


@dataclasses.dataclass(frozen=True)
class WorkerView:
    node: str
    group: str  # gpu0, cpu, io, mixed; for a hand-named worker, what it serves (cpu+io): nodes.worker_group
    host: str
    queues: tuple[str, ...]
    assist: str | None
    pool: str
    pool_size: int
    threads_per_task: int
    cpu_threads: int
    unhealthy_gpus: tuple[str, ...] = ()
    held: int = 0
    running: int = 0
    paused: bool = False
    has_gpus: bool = False
    no_gpu: str | None = None  # why a worker started on a GPU queue sees no GPU (it serves none)

    def serves(self, queue: str) -> bool:
        return queue in self.queues or self.assist == queue

    @property
    def has_room(self) -> bool:
        """Could take another task now: not paused, nothing held, a free slot."""
        return not self.paused and not self.held and self.running < self.pool_size


@dataclasses.dataclass(frozen=True)
class Decision:
    action: str  # move_consumer | reroute | grow | shrink | alert
    target: str
    why: str
    amount: int = 0
    queue: str | None = None
    kind: str | None = None  # for alerts
    host: str | None = None  # for grow/shrink: the host whose thread budget is shared


def assist_moves(queues: Mapping[str, QueueView], workers: Sequence[WorkerView], config: Config) -> list[Decision]:
    """Point each mixed worker at the queue whose backlog drains slowest, home when none waits."""
    home = config.rebalance.mixed_home
    decisions = []
    for worker in workers:
        if kinds_of(worker.group) != ("mixed",):
            continue
        # a mixed worker that sees no GPU is never sent to serve GPU tasks: it would refuse them
        servable = [q for q in MIXED_CAN_SERVE if worker.has_gpus or family(q) != Profile.GPU_INTENSIVE.queue]
        views = [queues[q] for q in servable if q in queues]
        busiest = max(views, key=lambda v: v.drain_s, default=None)
        current = queues.get(worker.assist) if worker.assist else None
        if busiest is None or busiest.expected_work_s == 0:
            target = home if home in queues and home in servable else None
            why = "nothing waits; back home" if target else "nothing waits"
        elif current is not None and current.expected_work_s > 0 and (
            busiest.drain_s < config.rebalance.hysteresis * current.drain_s
        ):
            continue  # still useful where it is; do not flap
        else:
            target = busiest.name
            why = (f"{busiest.name}: {busiest.waiting} waiting, ~{busiest.expected_work_s:.0f}s of work "
                   f"for {busiest.capacity} slots")
        if target != worker.assist:
            decisions.append(Decision("move_consumer", worker.node, why, queue=target))
    return decisions


def pool_sizes(queues: Mapping[str, QueueView], workers: Sequence[WorkerView], config: Config) -> list[Decision]:
    """Grow pools with work and shrink idle ones; CPU-bound pools share each host's thread budget."""
    decisions = []
    by_host: dict[str, list[WorkerView]] = {}
    for worker in workers:
        if worker.pool == "gevent" and worker.serves("cpu_light"):
            decisions += _gevent_size(worker, queues, config)
        elif worker.pool == "prefork" and {"cpu", "mixed"} & set(kinds_of(worker.group)):
            by_host.setdefault(worker.host, []).append(worker)
    for host_workers in by_host.values():
        decisions += _share_threads(host_workers, queues)
    return decisions


def _work(worker: WorkerView, queues: Mapping[str, QueueView]) -> float:
    served = set(worker.queues) | ({worker.assist} if worker.assist else set())
    return sum(queues[q].expected_work_s for q in served if q in queues)


def _share_threads(workers: list[WorkerView], queues: Mapping[str, QueueView]) -> list[Decision]:
    """Split the host's CPU threads among its prefork pools by expected work, one slot minimum."""
    budget = workers[0].cpu_threads
    work = {w.node: _work(w, queues) for w in workers}
    if not any(work.values()):
        return []
    spare = budget - sum(w.threads_per_task for w in workers)  # after one slot each
    total = sum(work.values())
    targets = {}
    for worker in workers:
        extra = math.floor(spare * work[worker.node] / total / worker.threads_per_task) if spare > 0 else 0
        targets[worker.node] = 1 + extra
    decisions = []
    for worker in sorted(workers, key=lambda w: targets[w.node] - w.pool_size):  # shrink before grow
        delta = targets[worker.node] - worker.pool_size
        if delta:
            used = sum(targets[w.node] * w.threads_per_task for w in workers)
            why = f"~{work[worker.node]:.0f}s of work; host threads {used}/{budget}"
            decisions.append(Decision("grow" if delta > 0 else "shrink", worker.node, why, amount=abs(delta),
                                      host=worker.host))
    return decisions


def gevent_ceiling(config: Config) -> int:
    """The most greenlets a ``cpu_light`` pool may grow to (``max_concurrency``, else 4x its size)."""
    queue_config = config.queue("cpu_light")
    return queue_config.max_concurrency or GEVENT_GROWTH * (queue_config.concurrency or 100)


def _gevent_size(worker: WorkerView, queues: Mapping[str, QueueView], config: Config) -> list[Decision]:
    base = config.queue("cpu_light").concurrency or 100
    ceiling = gevent_ceiling(config)
    view = queues.get("cpu_light")
    if view is None:
        return []
    if view.waiting > worker.pool_size and worker.pool_size < ceiling:
        amount = min(ceiling, worker.pool_size * 2) - worker.pool_size
        return [Decision("grow", worker.node, f"cpu_light: {view.waiting} waiting", amount=amount)]
    if view.waiting == 0 and view.in_flight < base and worker.pool_size > base:
        return [Decision("shrink", worker.node, "cpu_light drained", amount=worker.pool_size - base)]
    return []


def saturated(view: QueueView, workers: Sequence[WorkerView], fallback_depth: int) -> bool:
    """Deeper than *fallback_depth* and no GPU worker serving it could take a task now."""
    if view.waiting <= fallback_depth:
        return False
    return not any(w.has_room for w in workers if w.has_gpus and w.serves(view.name))


def alerts(queues: Mapping[str, QueueView], workers: Sequence[WorkerView], config: Config,
           groups_seen: Sequence[str]) -> list[Decision]:
    found = []
    for view in queues.values():
        cfg = config.queue(view.name.split(".", 1)[0])
        if view.waiting and not view.consumers:
            found.append(Decision("alert", f"no_consumer:{view.name}",
                                  f"{view.waiting} waiting and no worker serves it",
                                  queue=view.name, kind="no_consumer"))
        if cfg.alert_depth is not None and view.waiting > cfg.alert_depth:
            found.append(Decision("alert", f"depth:{view.name}", f"{view.waiting} waiting > {cfg.alert_depth}",
                                  queue=view.name, kind="depth"))
        if cfg.alert_age_s is not None and (view.oldest_age_s or 0) > cfg.alert_age_s:
            found.append(Decision("alert", f"age:{view.name}",
                                  f"oldest waited {view.oldest_age_s:.0f}s > {cfg.alert_age_s:.0f}s",
                                  queue=view.name, kind="age"))
    for worker in workers:
        if worker.no_gpu:
            found.append(Decision("alert", f"no_gpu:{worker.node}", f"started on a GPU queue but sees no GPU: "
                                  f"{worker.no_gpu}", kind="no_gpu"))
        if worker.unhealthy_gpus:
            found.append(Decision("alert", f"gpu_unhealthy:{worker.node}",
                                  f"unhealthy: {', '.join(worker.unhealthy_gpus)}", kind="gpu_unhealthy"))
    alive_groups = {w.group for w in workers}
    for group in sorted(set(groups_seen) - alive_groups):
        found.append(Decision("alert", f"group_down:{group}", f"worker group {group} was seen and is not alive",
                              kind="group_down"))
    return found


def scaling_hints(queues: Mapping[str, QueueView], workers: Sequence[WorkerView], config: Config) -> dict[str, int]:
    """Desired replicas per worker group to drain what waits within ``target_drain_s``."""
    served_by = {"gpu": "gpu", "cpu_intensive": "cpu", "cpu_light": "io", "mixed": "mixed"}
    hints = {}
    for queue, group in served_by.items():
        view = queues.get(queue)
        if view is None:
            continue
        members = [w for w in workers if group in kinds_of(w.group)]
        per_replica = max(1, max((w.pool_size for w in members), default=1))
        work = view.expected_work_s + view.in_flight * (view.mean_runtime_s or DEFAULT_RUNTIME_S)
        needed = math.ceil(work / (config.rebalance.target_drain_s * per_replica)) if work else 0
        hints[group] = max(needed, 1 if view.waiting or view.in_flight else 0)
    return hints

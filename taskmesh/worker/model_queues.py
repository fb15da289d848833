"""Which model queues a GPU worker consumes: those of the models warm in it, and those the
burst rule or a stranded queue says it should warm (``core.model_queues``).

Every other tick, on the event loop: the worker says which declared models its pool
processes hold or are loading (``MODEL_READY``, read by producers to route those tasks to the model
queues), then for each declared model decides whether to consume its queue, and joins or
leaves it with Celery's consumer (``Intake.add``/``drop`` over ``add_task_queue`` /
``cancel_task_queue``, honouring a pause). A message it already took from a queue it
leaves stays with it. Burst decisions are recorded with their numbers (``WARM_UPS``): the
first for each burst (the queue was empty before), then each time the verdict changes or
the queue has doubled since.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from taskmesh.core.claims import gpu_pool
from taskmesh.core.model_queues import model_of, model_queue, plan_warm_up, stranded_taker
from taskmesh.core.models import DEFAULT_LOAD_S
from taskmesh.state.keys import layout
from taskmesh.state.queues import queue_depths

log = logging.getLogger(__name__)
EVERY_TICKS = 2


class ModelQueues:
    def __init__(self, controller: Any) -> None:
        self.c = controller
        self.recorded: dict[str, tuple[bool, int]] = {}  # model → (verdict, queued) last recorded

    def update(self) -> None:
        c, warm = self.c, self.c.warm
        if not warm.specs or not c.gate.config.affinity or c.counters["ticks"] % EVERY_TICKS:
            return
        entries = warm.read().values()  # a model being loaded counts: its tasks had better wait for that copy
        held = {name for entry in entries for name in [*entry["models"], entry.get("loading")]} & set(warm.specs)
        slots = c.consumer.pool.num_processes
        # every model not held is withdrawn, not only those announced before: a worker restarted
        # under the same name must not leave producers believing its predecessor's models warm
        warm.store.set_ready(c.node, dict.fromkeys(held, slots), sorted(set(warm.specs) - held))
        consumed = {q for q in c.intake.consumed() if model_of(q) is not None}
        queues = [model_queue(name) for name in warm.specs if name not in held]
        depths = queue_depths(c.registry.client, queues, count_in_flight=False, **layout(c.consumer.app))
        view: dict[str, Any] = {}
        wanted = {model_queue(name) for name in held}
        for name in warm.specs:
            queue = model_queue(name)
            if name in held:
                continue
            if not depths[queue].waiting:
                self.recorded.pop(name, None)  # the next burst is recorded afresh
            elif self._follow(name, depths[queue].waiting, queue in consumed, view):
                wanted.add(queue)
        for queue in sorted(wanted - consumed):
            c.intake.add(queue)
            log.info("consuming %s", queue)
        for queue in sorted(consumed - wanted):
            c.intake.drop(queue)
            log.info("no longer consuming %s: its model is not warm here", queue)

    def _follow(self, name: str, queued: int, consuming: bool, view: dict[str, Any]) -> bool:
        """Whether to consume the queue of *name*, which is not warm here and has *queued* waiting."""
        c, store, spec = self.c, self.c.warm.store, self.c.warm.specs[name]
        if "live" not in view:  # read once per update, and only when some model queue waits
            view["live"] = {r.node: r for r in c.registry.workers() if c.registry.is_alive(r)}
            view["runs"] = c.registry.mean_runtimes()
            view["learned"] = store.learned()
        holders = {n: s for n, s in store.ready(name).items() if n in view["live"] and n != c.node}
        need = spec.vram_mib + self._task_vram(name)
        margin = c.gate.config.safety_margin_mib
        if not holders:  # stranded: one live worker whose GPUs could ever fit it takes it (and loads it)
            return stranded_taker(name, [n for n, r in view["live"].items()
                                         if any(g.memory_total_mib - margin >= need for g in r.gpus)]) == c.node
        if consuming:  # warming it: keep taking its tasks until the queue is empty
            return True
        load_s = view["learned"].get(name) or spec.load_s or DEFAULT_LOAD_S
        plan = plan_warm_up(queued, view["runs"].get(f"q:{model_queue(name)}"), sum(holders.values()), load_s)
        room = plan.warm and self._room(need, margin)
        reason = plan.reason if room or not plan.warm else f"{plan.reason}, but no GPU here has {need} MiB free"
        last = self.recorded.get(name)
        if last is None or last[0] != room or queued >= 2 * last[1]:
            self.recorded[name] = (room, queued)
            store.record_warm_up({"at": time.time(), "node": c.node, "model": name, "queued": queued,
                                  "holders": sorted(holders), "expected_wait_s": round(plan.expected_wait_s, 3),
                                  "load_s": round(load_s, 3), "warm": room, "reason": reason})
            log.info("model %s: %s", name, reason)
        return room

    def _room(self, need: int, margin: int) -> bool:
        gpus = list(self.c.gate.known.values())
        used = self.c.gate.ledger.used([gpu_pool(g.uuid) for g in gpus])
        return any(g.memory_total_mib - margin - used[gpu_pool(g.uuid)] >= need for g in gpus)

    def _task_vram(self, name: str) -> int:
        """The most memory a task for *name* declares beside the model."""
        tasks = self.c.consumer.app.tasks.values()
        return max((t.requirement.vram_mib or 0 for t in tasks
                    if getattr(getattr(t, "requirement", None), "model", None) == name), default=0)


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

Two things keep one model from being loaded on every GPU by the tasks a producer sent to
the profile queue before it knew the model was warm (it re-reads every ``app.affinity``
``CACHE_S``): a worker that admits a task which loads M says so at once (``announce``),
not at its next update; and a worker that takes such a task from the profile queue while
another live worker holds or loads M hands it over to M's model queue (``hand_over``, a
``Reroute``: published there, then acknowledged here) instead of loading M beside it.
Whether one more copy pays off is the burst rule's to say, not the order of arrival.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from taskmesh.core.claims import gpu_pool
from taskmesh.core.gate import Reroute
from taskmesh.core.model_queues import model_of, model_queue, plan_warm_up, stranded_taker
from taskmesh.core.models import DEFAULT_LOAD_S
from taskmesh.core.profiles import Profile
from taskmesh.state.client import broker_is_redis
from taskmesh.state.keys import layout
from taskmesh.state.queues import queue_depths

log = logging.getLogger(__name__)
EVERY_TICKS = 2
LIVE_CACHE_S = 1.0  # how stale the live workers read for ``hand_over`` may be
ANNOUNCED_S = 5.0  # an announced load counts as held until its pool process says it loads it


class ModelQueues:
    def __init__(self, controller: Any) -> None:
        self.c = controller
        self.recorded: dict[str, tuple[bool, int]] = {}  # model → (verdict, queued) last recorded
        self.enabled = bool(controller.gate.config.affinity) and broker_is_redis(controller.consumer.app)
        self._live: tuple[float, dict[str, Any]] = (0.0, {})  # (when read, live node → its record)
        self.announced: dict[str, tuple[float, str]] = {}  # model → (when, id of the task admitted to load it)

    def announce(self, model: str, task_id: str) -> None:
        """This worker has just admitted a task that loads *model*: producers and the other
        workers learn it now, so the next tasks for it come here rather than loading it again.
        It lasts until the pool process says it loads it, or that task ends (a failed load)."""
        if self.enabled:
            self.announced[model] = (time.monotonic(), task_id)
            self.c.warm.store.set_ready(self.c.node, {model: self.c.consumer.pool.num_processes}, [])

    def holders_elsewhere(self, model: str, need_mib: int = 0) -> list[str]:
        """The live workers other than this one that say they hold or are loading *model*, with
        a healthy GPU that could ever fit *need_mib*. The live set may be ``LIVE_CACHE_S`` old;
        the holders are read each time: a load costs seconds, a stale answer one more copy."""
        at, live = self._live
        if time.monotonic() - at > LIVE_CACHE_S:
            live = {r.node: r for r in self.c.registry.workers() if self.c.registry.is_alive(r)}
            self._live = (time.monotonic(), live)
        margin = self.c.gate.config.safety_margin_mib
        return sorted(n for n in self.c.warm.store.ready(model) if n in live and n != self.c.node and any(
            g.healthy and g.memory_total_mib - margin >= need_mib for g in live[n].gpus))

    def serving_elsewhere(self, requirement: Any, queue: str | None) -> list[str]:
        """Who serves a task taken from *queue* instead of this worker (``hand_over``): the other
        live workers that hold its model, when it came from the profile queue and asks for one
        GPU and one declared model; ``[]`` when it stays here. A task from any other queue (a
        model queue this worker follows to warm the model, a stranded one, a need queue, one
        the sender named) keeps its queue, as the producer's routing does."""
        model = requirement.model
        if (not self.enabled or model not in self.c.warm.specs or requirement.model_choices
                or queue != Profile.GPU_INTENSIVE.queue or requirement.gpus != 1):
            return []
        return self.holders_elsewhere(model, self.c.warm.specs[model].vram_mib + (requirement.vram_mib or 0))

    def hand_over(self, requirement: Any, queue: str | None) -> Reroute | None:
        """A task for a model that is not warm here, taken from *queue*: to the model's queue
        when another worker serves it (``serving_elsewhere``); else ``None``."""
        holders = self.serving_elsewhere(requirement, queue)
        if not holders:
            return None
        return Reroute(model_queue(requirement.model), f"model {requirement.model} is warm on {', '.join(holders)}")

    def update(self) -> None:
        c, warm = self.c, self.c.warm
        if not warm.specs or not c.gate.config.affinity or c.counters["ticks"] % EVERY_TICKS:
            return
        entries = warm.read().values()  # a model being loaded counts: its tasks had better wait for that copy
        held = {name for entry in entries for name in [*entry["models"], entry.get("loading")]} & set(warm.specs)
        now = time.monotonic()
        self.announced = {m: (at, task_id) for m, (at, task_id) in self.announced.items()
                          if now - at < ANNOUNCED_S and m not in held and task_id in c.reservations}
        held |= set(self.announced)
        slots = c.consumer.pool.num_processes
        # every model not held is withdrawn, not only those announced before: a worker restarted
        # under the same name must not leave producers believing its predecessor's models warm;
        # and a worker that takes no work now (lease in doubt, GPUs unhealthy) draws none to it
        ready = set() if c.blocked() else held
        warm.store.set_ready(c.node, dict.fromkeys(ready, slots), sorted(set(warm.specs) - ready))
        consumed = {q for q in c.intake.consumed() if model_of(q) is not None}
        queues = [model_queue(name) for name in warm.specs]
        depths = queue_depths(c.registry.client, queues, count_in_flight=False, **layout(c.consumer.app))
        view: dict[str, Any] = {"waiting": {name: depths[model_queue(name)].waiting for name in warm.specs}}
        wanted = {model_queue(name) for name in held}
        warming = {model_of(q) for q in consumed} - held  # followed to load, not loading yet
        for name in warm.specs:
            if name in held:
                continue
            if not view["waiting"][name]:
                self.recorded.pop(name, None)  # the next burst is recorded afresh
                continue
            others = sum(self._need(m) for m in warming if m and m != name)  # room they will take
            if self._follow(name, model_queue(name) in consumed, others, held, view):
                wanted.add(model_queue(name))
                warming.add(name)  # the next model weighed here counts the room this one takes
        for queue in sorted(wanted - consumed):
            c.intake.add(queue)
            log.info("consuming %s", queue)
        for queue in sorted(consumed - wanted):
            c.intake.drop(queue)
            log.info("no longer consuming %s: its model is not warm here", queue)

    def _follow(self, name: str, consuming: bool, others: int, held: set[str], view: dict[str, Any]) -> bool:
        """Whether to consume the queue of *name*, which is not warm here and has messages waiting
        (*others*: the memory of the models this worker follows to load and has not begun to)."""
        c, store = self.c, self.c.warm.store
        if "live" not in view:  # read once per update, and only when some model queue waits
            view["live"] = {r.node: r for r in c.registry.workers() if c.registry.is_alive(r)}
            view["runs"] = c.registry.mean_runtimes()
            view["learned"] = store.learned()
            view["ready"] = {m: {n: s for n, s in store.ready(m).items() if n in view["live"] or n == c.node}
                             for m in c.warm.specs}
        holders = {n: s for n, s in view["ready"][name].items() if n != c.node}
        need, spec = self._need(name), self.c.warm.specs[name]
        margin = c.gate.config.safety_margin_mib
        if not holders:  # stranded: one live worker whose GPUs could ever fit it takes it (and loads it)
            return stranded_taker(name, [n for n, r in view["live"].items()
                                         if any(g.healthy and g.memory_total_mib - margin >= need
                                                for g in r.gpus)]) == c.node
        if consuming:  # warming it: keep taking its tasks while it still fits beside what else loads here
            return self._room(need + others, margin)
        queued = view["waiting"][name]
        load_s = view["learned"].get(name) or spec.load_s or DEFAULT_LOAD_S
        besides = min(self._backlog_s({m for m, nodes in view["ready"].items() if node in nodes} - {name}, view)
                      or 0.0 for node in holders)  # a holder's unmeasured work: not counted, as if none
        plan = plan_warm_up(queued, view["runs"].get(f"q:{model_queue(name)}"), sum(holders.values()), load_s,
                            besides, self._backlog_s(held, view))
        room = plan.warm and self._room(need + others, margin)
        reason = plan.reason if room or not plan.warm else f"{plan.reason}, but no GPU here has {need} MiB free"
        last = self.recorded.get(name)
        if last is None or last[0] != room or queued >= 2 * last[1]:
            self.recorded[name] = (room, queued)
            store.record_warm_up({"at": time.time(), "node": c.node, "model": name, "queued": queued,
                                  "holders": sorted(holders), "expected_wait_s": round(plan.expected_wait_s, 3),
                                  "load_s": round(load_s, 3), "warm": room, "reason": reason})
            log.info("model %s: %s", name, reason)
        return room

    @staticmethod
    def _backlog_s(models: set[str], view: dict[str, Any]) -> float | None:
        """The queued work of *models* a GPU holding them serves: each model queue's messages
        times its measured mean run, shared by its holders' slots; ``None`` when messages wait
        for one whose run was never measured."""
        total = 0.0
        for model in models:
            waiting, run = view["waiting"].get(model, 0), view["runs"].get(f"q:{model_queue(model)}")
            if waiting and not run:
                return None
            total += waiting * (run or 0.0) / max(sum(view["ready"].get(model, {}).values()), 1)
        return total

    def _room(self, need: int, margin: int) -> bool:
        gpus = list(self.c.gate.known.values())
        used = self.c.gate.ledger.used([gpu_pool(g.uuid) for g in gpus])
        return any(g.memory_total_mib - margin - used[gpu_pool(g.uuid)] >= need for g in gpus)

    def _need(self, name: str) -> int:
        """*name*'s memory and the most a task for it declares beside it."""
        tasks = self.c.consumer.app.tasks.values()
        return self.c.warm.specs[name].vram_mib + max(
            (t.requirement.vram_mib or 0 for t in tasks
             if getattr(getattr(t, "requirement", None), "model", None) == name), default=0)


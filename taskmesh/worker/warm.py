"""Warm models on the worker's side: admission that knows what its pool processes hold,
eviction decisions, and the model reservations the heartbeat keeps alive.

The models themselves live in the pool processes (``app.warm``), which write what they
hold to the worker's model hash. Here, in the main process:

* a task for a model every pool process holds warm reserves only its own ``vram``
  (a task with ``model=`` and no ``vram`` needs nothing beyond the model); otherwise its
  reservation also carries the model's memory (``claim``), which the process that loads
  it moves to the model's own reservation — one amount, never counted twice;
* a task for a model that is not warm here but is on another live worker is handed over
  to the model's queue (``model_queues.hand_over``) rather than loading a second copy;
* a GPU task that does not fit because idle warm models hold the memory asks
  ``core.models.plan_eviction``; every decision is recorded with its reason. Eviction
  runs only where one process holds the models (prefork with one slot per GPU, or a
  threads pool) and nothing runs, so the idle model is in the process that will run
  the task;
* the model reservations of live pool processes are refreshed with the tasks'
  (``held``); those of processes that are gone are released, and when the whole worker
  dies nobody refreshes them and they expire with its other reservations.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import time
from typing import Any

from taskmesh.core.claims import gpu_pool
from taskmesh.core.gate import Admitted, Decision, Wait
from taskmesh.core.headers import WARM_HEADER
from taskmesh.core.models import (
    BUSY,
    DEFAULT_LOAD_S,
    DEFAULT_RUN_S,
    IDLE,
    READY,
    Eviction,
    ModelSpec,
    WarmModel,
    plan_eviction,
)
from taskmesh.state.keys import RUNTIMES, layout
from taskmesh.state.models import ModelStore
from taskmesh.state.queues import next_tasks

QUEUE_SAMPLE = 64  # messages read from the head's queue to count the work waiting there


class WarmModels:
    def __init__(self, controller: Any) -> None:
        self.c = controller
        declared = getattr(controller.consumer.app, "taskmesh_models", None) or {}
        self.specs: dict[str, ModelSpec] = {name: d.spec for name, d in declared.items()}
        self.store = ModelStore(controller.registry.client, ttl_s=getattr(controller.gate.ledger, "ttl_s", 15.0))
        self.entries: dict[int, dict[str, Any]] = {}  # the pool processes' entries, as last read
        # (the idle copies' reservations, evicts): a decision is recorded when it changes, not
        # each time a held task (or, with backfill, each task of its window) asks again
        self.recorded: set[tuple[tuple[str, ...], bool]] = set()

    # --- what the pool processes hold --------------------------------------------------

    def _live_pids(self) -> set[int]:
        pool = self.c.consumer.pool
        inner = getattr(getattr(pool, "_pool", None), "_pool", None)
        if inner is None:  # threads or solo: the models live in this process
            return {os.getpid()}
        return {p.pid for p in list(inner) if p.pid}

    def read(self) -> dict[int, dict[str, Any]]:
        """The live pool processes' entries; those of processes that are gone are released."""
        if not self.specs:
            return {}
        entries = self.store.held(self.c.node)
        live = self._live_pids()
        for pid in [p for p in entries if p not in live]:
            for model in entries.pop(pid)["models"].values():
                if model.get("pool"):
                    self.c.gate.ledger.release(model["reservation"], [model["pool"]])
            self.store.forget(self.c.node, [pid])
        self.entries = entries
        return entries

    def held(self, reservations: dict[str, dict[str, int]]) -> dict[str, dict[str, int]]:
        """*reservations* (the tasks') with the model reservations added, and the claims that
        became a model's taken out of the task that carried them."""
        out = {rid: dict(claims) for rid, claims in reservations.items()}
        for entry in self.read().values():
            for model in entry["models"].values():
                if not model.get("pool"):
                    continue
                out[model["reservation"]] = {model["pool"]: model["vram_mib"]}
                carried = out.get(model.get("adopted_from") or "")
                if carried and model["pool"] in carried:
                    carried[model["pool"]] = max(0, carried[model["pool"]] - model["vram_mib"])
        return out

    def release_all(self) -> None:
        """At shutdown, with the pool processes gone: their models' memory goes now."""
        for pid, entry in self.read().items():
            for model in entry["models"].values():
                if model.get("pool"):
                    self.c.gate.ledger.release(model["reservation"], [model["pool"]])
            self.store.forget(self.c.node, [pid])

    # --- admission -------------------------------------------------------------------

    def decide(self, held: Any, reservation: str) -> Decision:
        requirement = held.requirement
        held.message.headers.pop(WARM_HEADER, None)  # a retry's copy of an earlier run's instructions
        if not self.specs or not requirement.needs_gpu:
            return self.c.gate.decide(requirement, reservation)
        entries = self.read()
        if requirement.model is None and self.c.exclusive.owns(held.message) and any(
                e["models"] for e in entries.values()):  # an exclusive batch's item unloads every model first
            decision, evict = self._maybe_evict(held, requirement, reservation, entries, Wait("models to unload"),
                                                forced=True)
            if evict:
                held.message.headers[WARM_HEADER] = {"reservation": reservation, "claim": 0, "evict": evict}
                return decision
        # one message only: a micro-batch's envelope stands for many and cannot be published on
        if hasattr(held.message, "ack") and self._claim(requirement.model, entries):
            handed = self.c.model_queues.hand_over(requirement, (held.message.delivery_info or {}).get("routing_key"))
            if handed is not None:  # warm on another GPU: its tasks go there, not to a second load here
                return handed
        tried: list[tuple[Any, int, Decision]] = []
        for choice in self._choices(requirement, entries):  # one, or model=[...]'s, warm ones first
            claim = self._claim(choice.model, entries)
            if choice.model in self.specs:  # no ``vram``: nothing beyond the model, not the whole GPU
                choice = dataclasses.replace(choice, vram_mib=(choice.vram_mib or 0) + claim)
            decision = self.c.gate.decide(choice, reservation)
            tried.append((choice, claim, decision))
            if isinstance(decision, Admitted):
                break
        if not isinstance(tried[-1][2], Admitted):  # the first to wait (it may evict), else the last reroute
            tried.append(next((t for t in tried if isinstance(t[2], Wait)), tried[-1]))
        choice, claim, decision = tried[-1]
        evict: list[tuple[str, int]] = []
        if isinstance(decision, Wait):
            decision, evict = self._maybe_evict(held, choice, reservation, entries, decision)
        if isinstance(decision, Admitted) and (choice.model in self.specs or evict):
            held.message.headers[WARM_HEADER] = {"reservation": reservation, "claim": claim, "evict": evict,
                                                 "model": choice.model}
            if claim and choice.model in self.specs:
                self.c.model_queues.announce(choice.model, held.message.headers.get("id"))
        return decision

    def _choices(self, requirement: Any, entries: dict[int, dict[str, Any]]) -> list[Any]:
        """``model=[...]``: its declared models, those warm in every pool process first, each in
        the order given (the preferred, largest, first); otherwise the requirement itself."""
        names = [n for n in requirement.model_choices if n in self.specs]
        if not names:
            return [requirement]
        warm = [n for n in names if self._claim(n, entries) == 0]
        return [requirement.with_model(n) for n in warm + [n for n in names if n not in warm]]

    def warm_here(self, model: str) -> bool:
        """Whether every pool process holds *model* warm, so a task for it needs no load here."""
        return model in self.specs and self._claim(model, self.read()) == 0

    def _claim(self, model: str | None, entries: dict[int, dict[str, Any]]) -> int:
        """The model memory a task must carry: none when the model is warm in whichever process runs it."""
        spec = self.specs.get(model or "")
        if spec is None:
            return 0
        holders = sum(1 for e in entries.values() if spec.name in e["models"])
        return 0 if holders >= len(self._live_pids()) else spec.vram_mib

    def _maybe_evict(self, held: Any, requirement: Any, reservation: str, entries: dict[int, dict[str, Any]],
                     waited: Wait, forced: bool = False) -> tuple[Decision, list[tuple[str, int]]]:
        """Evict idle warm models for *held* when the rule says so (*forced*: all of them, for an
        exclusive batch); only where one process holds the models and nothing runs."""
        c = self.c
        if requirement.gpus != 1 or len(self._live_pids()) != 1 or c.reservations or len(entries) != 1:
            return waited, []
        (entry,) = entries.values()
        if entry["state"] != READY or not entry["models"]:
            return waited, []
        model = next(iter(entry["models"].values()))
        gpu = next((g for g in c.gate.known.values() if gpu_pool(g.uuid) == model["pool"]), None)
        if gpu is None:
            return waited, []
        capacity = gpu.memory_total_mib - c.gate.config.safety_margin_mib
        need = capacity if requirement.exclusive or requirement.vram_mib is None else requirement.vram_mib
        short = need - (capacity - c.gate.ledger.used([model["pool"]])[model["pool"]])
        learned = self.store.learned()
        idle = [WarmModel(name, m["vram_mib"], m["last_used"],
                          learned.get(name) or (self.specs[name].load_s if name in self.specs else None)
                          or DEFAULT_LOAD_S, bool(m.get("never_evict")), m["reservation"])
                for name, m in entry["models"].items()]
        line = [held] + [h for h in c.held if h is not held]
        waiting_s = self._waiting_s(line, held, set(entry["models"]))
        waited_s = max(time.monotonic() - h.since for h in line)
        plan = Eviction(tuple(idle), "an exclusive batch has the GPU") if forced else plan_eviction(
            short, idle, waiting_s, waited_s)
        task_id = held.message.headers.get("id")
        seen = (tuple(sorted(m.holder for m in idle)), plan.evicts)
        if seen not in self.recorded:
            if len(self.recorded) > 10_000:
                self.recorded.clear()
            self.recorded.add(seen)
            self.store.record_eviction({
                "at": time.time(), "node": c.node, "gpu": gpu.uuid, "task": held.message.headers.get("task"),
                "task_id": task_id, "need_mib": need, "short_mib": short, "waiting_s": round(waiting_s, 3),
                "waited_s": round(waited_s, 1),
                "evict": [m.name for m in plan.evict], "kept": [m.name for m in idle if m not in plan.evict],
                "evicted": plan.evicts, "reason": plan.reason})
        if not plan.evicts:
            return Wait(f"{waited.reason}; {plan.reason}"), []
        freed = sum(m.vram_mib for m in plan.evict)
        reduced = dataclasses.replace(requirement, vram_mib=max(need - freed, 0), exclusive=False)
        decision = c.gate.decide(reduced, reservation)
        if not isinstance(decision, Admitted):
            return waited, []
        # what it holds once its process has unloaded the models and taken over their memory
        full = tuple(a + freed if p == model["pool"] else a for p, a in zip(decision.pools, decision.amounts,
                                                                             strict=True))
        return dataclasses.replace(decision, amounts=full), [(m.name, m.vram_mib) for m in plan.evict]

    def _waiting_s(self, line: list[Any], held: Any, idle: set[str]) -> float:
        """The work the memory would serve: the held GPU tasks and the next ``QUEUE_SAMPLE`` out
        of the head's queue, each for its learned mean run time. Left out: tasks for the idle
        models themselves (they need none of it), and those taken from the profile queue for a
        model warm on another worker (they are handed over to it, ``model_queues.hand_over``)."""
        asked: dict[tuple[Any, ...], bool] = {}  # one read of the model's holders per kind of task

        def served(requirement: Any, queue: str | None) -> bool:
            if not requirement.needs_gpu or requirement.model in idle:
                return False
            key = (requirement.model, requirement.model_choices, requirement.gpus, requirement.vram_mib, queue)
            if key not in asked:
                asked[key] = not self.c.model_queues.serving_elsewhere(requirement, queue)
            return asked[key]

        names = collections.Counter(h.message.headers.get("task") for h in line
                                    if served(h.requirement, (h.message.delivery_info or {}).get("routing_key")))
        queue = (held.message.delivery_info or {}).get("routing_key")
        if queue:
            app = self.c.consumer.app
            for name, count in next_tasks(self.c.registry.client, queue, QUEUE_SAMPLE, **layout(app)).items():
                requirement = getattr(app.tasks.get(name), "requirement", None)
                if requirement is None or served(requirement, queue):
                    names[name] += count
        return sum(count * self._expected_run_s(name) for name, count in names.items())

    def _expected_run_s(self, name: str | None) -> float:
        total, count = self.c.registry.client.hmget(RUNTIMES, f"t:{name}:sum", f"t:{name}:count")
        return float(total) / float(count) if total and count and float(count) else DEFAULT_RUN_S

    # --- what operators see ------------------------------------------------------------

    def gpu_view(self, uuid: str, running: bool) -> dict[str, Any]:
        """The GPU's state (idle, loading, ready, busy, unloading) and the models warm on it."""
        pool = gpu_pool(uuid)
        here = [e for e in self.entries.values()
                if e.get("pool") == pool or any(m.get("pool") == pool for m in e["models"].values())]
        models = {name: m for e in here for name, m in e["models"].items() if m.get("pool") == pool}
        moving = [e["state"] for e in here if e.get("state") not in (IDLE, READY, BUSY)]
        state = moving[0] if moving else BUSY if running else READY if models else IDLE
        return {
            "state": state,
            "models": sorted(models),
            "model_tasks": sum(m.get("tasks", 0) for m in models.values()),
            "model_last_used": max((m.get("last_used", 0) for m in models.values()), default=None),
        }

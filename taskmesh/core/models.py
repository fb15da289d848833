"""Warm models as policy: what a declared model is, the states of a GPU that holds models,
and when to evict an idle warm model for waiting work.

Pure (no Celery, no Redis), so the worker, tests and a simulator decide alike. The
eviction rule is seed 001's made general: free the memory of idle warm models only when
the work waiting for that memory, times its expected run time, exceeds what reloading
those models would cost; the least recently used go first; a ``never_evict`` model (the
"brain") never goes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

# A GPU's states: idle → loading(model) → ready(model) ⇄ busy → unloading → idle.
IDLE, LOADING, READY, BUSY, UNLOADING = "idle", "loading", "ready", "busy", "unloading"
GPU_STATES = (IDLE, LOADING, READY, BUSY, UNLOADING)
MODEL_RESERVATION_PREFIX = "model:"  # task reservations are "<node>#<incarnation>/<task id>"
DEFAULT_LOAD_S = 30.0  # a model's reload cost before any load was measured or declared
DEFAULT_RUN_S = 10.0  # a task's expected run time before any run was measured


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """A declared model: its device memory, a first guess at its load time, and whether it
    may ever be evicted."""

    name: str
    vram_mib: int
    load_s: float | None = None
    never_evict: bool = False


def model_reservation(node: str, pid: int, name: str) -> str:
    """The ledger id of *name* held by pool process *pid* of worker *node*: one per copy,
    never equal to a task's reservation id."""
    return f"{MODEL_RESERVATION_PREFIX}{node}/{pid}/{name}"


@dataclasses.dataclass(frozen=True)
class WarmModel:
    """An idle model that could be evicted: what it holds and what reloading it costs."""

    name: str
    vram_mib: int
    last_used: float  # any clock, compared only with the others'
    reload_s: float
    never_evict: bool = False
    holder: str = ""  # its ledger reservation id


@dataclasses.dataclass(frozen=True)
class Eviction:
    """A decision: which models to evict (none: keep them all, the work waits) and why."""

    evict: tuple[WarmModel, ...]
    reason: str

    @property
    def evicts(self) -> bool:
        return bool(self.evict)


def plan_eviction(short_mib: int, idle: Sequence[WarmModel], waiting_s: float, waited_s: float = 0.0) -> Eviction:
    """Whether to free *short_mib* by evicting idle warm models.

    *waiting_s* is the work that memory would serve: the waiting tasks that need it times
    their expected run times; *waited_s*, how long the oldest of them has waited already.
    Victims are taken least recently used first, skipping ``never_evict`` ones, until
    enough is freed; they go only if the two together exceed the sum of their reload
    times. The wait counts so that a lone short task is not kept out for ever by idle
    models whose reload it alone would never outweigh: after waiting that long, it has
    paid the reload once already.
    """
    if short_mib <= 0:
        return Eviction((), "nothing to free")
    protected = [m.name for m in idle if m.never_evict]
    victims: list[WarmModel] = []
    freed = 0
    for model in sorted((m for m in idle if not m.never_evict), key=lambda m: m.last_used):
        if freed >= short_mib:
            break
        victims.append(model)
        freed += model.vram_mib
    if freed < short_mib:
        kept = f"; never_evict: {', '.join(protected)}" if protected else ""
        return Eviction((), f"keep: evicting every idle model that may go frees {freed} MiB of the "
                            f"{short_mib} MiB needed{kept}")
    cost = sum(m.reload_s for m in victims)
    names = ", ".join(m.name for m in victims)
    weighed = f"waiting work {waiting_s:.1f}s + waited {waited_s:.1f}s"
    if waiting_s + waited_s > cost:
        return Eviction(tuple(victims), f"evict {names}: {weighed} > reload {cost:.1f}s")
    return Eviction((), f"keep {names}: {weighed} <= reload {cost:.1f}s")

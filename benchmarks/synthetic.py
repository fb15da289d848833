"""A synthetic fleet and workload for the simulator, and the lower bound on makespan.

The fleet mixes three GPU kinds, eight to a host; the workload mixes memory sizes,
durations (log-normal around a median per class), a compute-capability requirement,
whole-GPU tasks (no ``vram`` declared, so admission gives them the GPU alone) and a
few that no GPU can run. Classes are declared with the same options as ``@app.task``
and validated by ``Requirement.from_options``.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import random
from collections.abc import Sequence

from taskmesh.core.gpus import GpuInfo, parse_simulated_spec
from taskmesh.core.need_queues import fits
from taskmesh.core.requirements import Requirement

GPUS_PER_HOST = 8
#: name → simulated-GPU spec of one GPU; hosts cycle through HOST_PATTERN.
GPU_KINDS = {"h100": "1x80GiB,cc=9.0", "a6000": "1x48GiB,cc=8.6", "l4": "1x24GiB,cc=8.9"}
HOST_PATTERN = ("l4", "h100", "l4", "a6000")


@dataclasses.dataclass(frozen=True)
class TaskClass:
    name: str
    options: dict[str, object]
    weight: float
    median_s: float


TASK_CLASSES = (
    TaskClass("embed", {"profile": "gpu", "vram": "2GiB"}, 0.30, 10),
    TaskClass("transcribe", {"profile": "gpu", "vram": "6GiB"}, 0.30, 40),
    TaskClass("finetune", {"profile": "gpu", "vram": "20GiB"}, 0.15, 120),
    TaskClass("llm-34b", {"profile": "gpu", "vram": "40GiB"}, 0.10, 150),
    TaskClass("llm-70b", {"profile": "gpu", "vram": "70GiB"}, 0.04, 200),
    TaskClass("fp8-kernel", {"profile": "gpu", "vram": "8GiB", "min_compute_capability": "9.0"}, 0.05, 60),
    TaskClass("train-whole-gpu", {"profile": "gpu"}, 0.0595, 300),
    TaskClass("too-big", {"profile": "gpu", "vram": "100GiB"}, 0.0005, 60),
)


@dataclasses.dataclass(frozen=True)
class Host:
    name: str
    kind: str
    spec: str  # a SimulatedProvider spec


def make_fleet(gpus: int) -> list[Host]:
    hosts = []
    for index in range(math.ceil(gpus / GPUS_PER_HOST)):
        kind = HOST_PATTERN[index % len(HOST_PATTERN)]
        count = min(GPUS_PER_HOST, gpus - index * GPUS_PER_HOST)
        hosts.append(Host(f"sim-{kind}-{index:04d}", kind, GPU_KINDS[kind].replace("1x", f"{count}x", 1)))
    return hosts


def requirements(classes: Sequence[TaskClass] = TASK_CLASSES) -> list[Requirement]:
    return [Requirement.from_options(f"sim.{c.name}", c.options) for c in classes]


def make_jobs(count: int, seed: int, classes: Sequence[TaskClass] = TASK_CLASSES) -> list[tuple[int, float]]:
    """(class index, duration in seconds) for *count* tasks."""
    rng = random.Random(seed)
    picks = rng.choices(range(len(classes)), weights=[c.weight for c in classes], k=count)
    return [(c, round(min(20 * classes[c].median_s, max(0.5, rng.lognormvariate(
        math.log(classes[c].median_s), 0.6))), 3)) for c in picks]


def kind_gpu(kind: str) -> GpuInfo:
    spec = parse_simulated_spec(GPU_KINDS[kind])[0]
    return GpuInfo(0, kind, kind, spec.memory_mib, 0, spec.compute_capability)


def kind_counts(fleet: Sequence[Host]) -> dict[str, int]:
    """GPU kind → how many GPUs of it the fleet has."""
    return {k: sum(parse_simulated_spec(h.spec)[0].count for h in fleet if h.kind == k)
            for k in sorted({h.kind for h in fleet})}


def eligible_kinds(kinds: Sequence[str], reqs: Sequence[Requirement], margin: int) -> list[frozenset[str]]:
    """Per task class, the GPU kinds that can run it."""
    return [frozenset(k for k in kinds if fits(kind_gpu(k), r, margin)) for r in reqs]


def whole_gpu(requirement: Requirement) -> bool:
    """Does the gate give this task a GPU alone (exclusive, or no ``vram`` declared)?"""
    return requirement.exclusive or requirement.vram_mib is None


def lower_bound(fleet: Sequence[Host], jobs: Sequence[tuple[int, float]], reqs: Sequence[Requirement],
                slots: int, margin: int) -> dict[str, float]:
    """No schedule can finish sooner: for every set S of GPU kinds, the tasks that only S
    can run need S's memory x time and S's slots x time; and the longest task runs alone."""
    count = kind_counts(fleet)
    kinds = sorted(count)
    usable = {k: kind_gpu(k).memory_total_mib - margin for k in kinds}
    eligible = eligible_kinds(kinds, reqs, margin)
    area: dict[frozenset[str], float] = {}
    work: dict[frozenset[str], float] = {}
    longest = 0.0
    for cls, duration in jobs:
        where = eligible[cls]
        if not where:
            continue
        whole = whole_gpu(reqs[cls])
        need = min(usable[k] for k in where) if whole else reqs[cls].vram_mib
        area[where] = area.get(where, 0.0) + need * duration
        work[where] = work.get(where, 0.0) + duration * (slots if whole else 1)
        longest = max(longest, duration)
    memory_bound = slot_bound = 0.0
    for size in range(1, len(kinds) + 1):
        for subset in map(frozenset, itertools.combinations(kinds, size)):
            inside = [w for w in area if w <= subset]
            memory_bound = max(memory_bound, sum(area[w] for w in inside) / sum(usable[k] * count[k] for k in subset))
            slot_bound = max(slot_bound, sum(work[w] for w in inside) / sum(slots * count[k] for k in subset))
    return {"bound_s": round(max(memory_bound, slot_bound, longest), 1), "memory_bound_s": round(memory_bound, 1),
            "slot_bound_s": round(slot_bound, 1), "longest_task_s": longest,
            "feasible_tasks": sum(1 for cls, _ in jobs if eligible[cls])}

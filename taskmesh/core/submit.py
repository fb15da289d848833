"""Feasibility: what no hardware seen recently can ever give (checked at submit), and what
this one machine cannot (``taskmesh doctor``)."""

from __future__ import annotations

from taskmesh.core.need_queues import fits
from taskmesh.core.profiles import Profile
from taskmesh.core.records import Capacity
from taskmesh.core.requirements import Requirement
from taskmesh.core.sizes import format_mib


def infeasible(requirement: Requirement, capacity: Capacity, margin_mib: int) -> str | None:
    """What no hardware seen recently can ever give, or ``None``; silent on kinds never seen."""
    if requirement.needs_gpu and requirement.profile is Profile.GPU_INTENSIVE and capacity.gpus:
        if not any(fits(g, requirement, margin_mib) for g in capacity.gpus):
            asked = []
            if requirement.vram_mib:
                asked.append(f"vram={format_mib(requirement.vram_mib)}")
            if requirement.min_compute_capability:
                asked.append("min_compute_capability={}.{}".format(*requirement.min_compute_capability))
            largest = max(capacity.gpus, key=lambda g: g.memory_total_mib)
            newest = max(capacity.gpus, key=lambda g: g.compute_capability)
            return (
                f"asked for {' and '.join(asked)}; the largest GPU seen has {format_mib(largest.memory_total_mib)} "
                f"({format_mib(largest.memory_total_mib - margin_mib)} after the safety margin), the highest "
                "compute capability seen is {}.{}".format(*newest.compute_capability)
            )
        if capacity.gpus_per_worker is not None and requirement.gpus > capacity.gpus_per_worker:
            return (
                f"asked for gpus={requirement.gpus}; the most GPUs one worker sees is {capacity.gpus_per_worker} "
                "(taskmesh worker --profile gpu pins one GPU per worker: run a celery worker, or the mixed "
                f"worker, where {requirement.gpus} GPUs are visible)"
            )
    if capacity.cpu_threads is not None and requirement.cpu_threads > capacity.cpu_threads:
        return f"asked for cpu_threads={requirement.cpu_threads}; the largest host seen has {capacity.cpu_threads}"
    if capacity.memory_total_mib is not None and (requirement.memory_mib or 0) > capacity.memory_total_mib:
        return (
            f"asked for memory={format_mib(requirement.memory_mib or 0)}; the largest host seen has "
            f"{format_mib(capacity.memory_total_mib)}"
        )
    return None


def runs_here(requirement: Requirement, machine: Capacity, margin_mib: int) -> str | None:
    """Why one machine (its ``Capacity``) can never run the task, or ``None``.

    Unlike ``infeasible``, a machine with no GPU is a reason here: doctor asks about
    this machine, not the fleet.
    """
    if requirement.profile is Profile.GPU_INTENSIVE and not machine.gpus:
        return "it needs a GPU and none is visible here; run it where a GPU worker is"
    return infeasible(requirement, machine, margin_mib)

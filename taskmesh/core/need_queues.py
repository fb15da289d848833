"""Need queues: where GPU tasks go that only some GPUs can ever run.

A worker whose GPUs can never fit a task (too little memory, too old a compute
capability) does not hold it: it publishes it to the queue named by what it needs
(``gpu.40960MiB.cc9.0``; ``gpu.x2.10240MiB`` for a task that needs two GPUs at once),
registers that queue, and acknowledges it. Every GPU worker that sees enough GPUs that
could run what a registered need queue holds consumes it. The count is part of the
name: a worker with one GPU never consumes a two-GPU queue, so such a task is never
bounced back to it. Producers send such tasks there directly when the registry shows
that only some GPUs fit, or when the task needs more than one.
"""

from __future__ import annotations

from collections.abc import Iterable

from taskmesh.core.gpus import GpuInfo
from taskmesh.core.profiles import Profile
from taskmesh.core.requirements import Requirement


def need_queue(requirement: Requirement) -> str:
    """The queue for GPU tasks that only some GPUs can run, named by what they need."""
    parts = ["gpu"]
    if requirement.gpus > 1:
        parts.append(f"x{requirement.gpus}")
    if requirement.vram_mib:
        parts.append(f"{requirement.vram_mib}MiB")
    if requirement.min_compute_capability:
        parts.append("cc{}.{}".format(*requirement.min_compute_capability))
    return ".".join(parts)


#: Where the items of an exclusive batch job wait (``submit_batch(exclusive=True)``): every
#: GPU worker consumes it always, and only it while the batch runs.
EXCLUSIVE_QUEUE = "gpu.exclusive"


def family(queue: str) -> str:
    """The profile queue a queue belongs to (``gpu.40960MiB`` belongs to ``gpu``)."""
    return queue.split(".", 1)[0] if queue.startswith("gpu.") else queue


def need_of(vram_mib: int | None, compute_capability: tuple[int, int] | None, gpus: int = 1) -> Requirement:
    """The requirement a registered need queue stands for."""
    return Requirement(Profile.GPU_INTENSIVE, vram_mib=vram_mib, min_compute_capability=compute_capability,
                       gpus=gpus)


def fits(gpu: GpuInfo, requirement: Requirement, margin_mib: int) -> bool:
    """Whether *gpu* could ever run the task (capacity and compute capability)."""
    if requirement.min_compute_capability and gpu.compute_capability < requirement.min_compute_capability:
        return False
    return requirement.vram_mib is None or requirement.vram_mib <= gpu.memory_total_mib - margin_mib


def can_serve(gpus: Iterable[GpuInfo], need: Requirement, margin_mib: int) -> bool:
    """Whether enough of *gpus* could ever run *need* together (its GPU count included)."""
    return sum(1 for g in gpus if fits(g, need, margin_mib)) >= need.gpus

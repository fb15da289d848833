"""Where the current task runs: node, pool and GPUs, for tasks that choose a code path.

A ``mixed`` task, or one that fell back from ``gpu`` to ``cpu_intensive``, asks
``current_placement()`` instead of probing CUDA itself; probing would initialise
CUDA in a process that may later fork.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import threading

import billiard.process
from celery import current_task

from taskmesh.core.headers import FALLBACK_HEADER, GPUS_HEADER


@dataclasses.dataclass(frozen=True)
class Placement:
    node: str | None
    queue: str | None
    pool: str
    gpu_uuids: tuple[str, ...]
    fallback_from: str | None = None  # the profile's own queue, when the task was sent to its fallback

    @property
    def on_gpu(self) -> bool:
        return bool(self.gpu_uuids)

    @property
    def cuda_device(self) -> str | None:
        """``cuda:N`` for the first admitted GPU, indexed as ``CUDA_VISIBLE_DEVICES`` lists them."""
        visible = visible_gpus()
        if not self.gpu_uuids:
            return None
        return f"cuda:{visible.index(self.gpu_uuids[0])}" if self.gpu_uuids[0] in visible else "cuda:0"


def current_pool() -> str:
    """The pool running this code: prefork, threads, gevent or solo."""
    gevent_monkey = sys.modules.get("gevent.monkey")
    if gevent_monkey is not None and gevent_monkey.is_module_patched("socket"):
        return "gevent"
    if billiard.process.current_process().name.startswith("ForkPoolWorker"):
        return "prefork"
    if threading.current_thread() is not threading.main_thread():
        return "threads"
    return "solo"


def visible_gpus() -> tuple[str, ...]:
    value = os.environ.get("CUDA_VISIBLE_DEVICES", "")
    return tuple(part for part in (p.strip() for p in value.split(",")) if part)


def current_placement() -> Placement:
    """Where this task runs; ``gpu_uuids`` are the GPUs admission reserved for it."""
    request = getattr(current_task, "request", None)
    delivery = getattr(request, "delivery_info", None) or {}
    admitted = getattr(request, GPUS_HEADER, None)
    return Placement(
        node=getattr(request, "hostname", None),
        queue=delivery.get("routing_key"),
        pool=current_pool(),
        gpu_uuids=tuple(admitted) if admitted is not None else visible_gpus(),
        fallback_from=getattr(request, FALLBACK_HEADER, None),
    )

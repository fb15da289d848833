"""The tasks of scenario 6 (real GPU): each allocates real device memory with PyTorch
and multiplies matrices on the GPU for a while. The same code is registered twice:
on a taskmesh app, where each task declares its ``vram`` and admission decides when
it runs, and on a plain Celery app, where nothing does — the unguarded side.

Sizes are fractions of the real GPU's memory, so they are only known at run time:
the benchmark passes the declared sizes to the workers in ``TASKMESH_BENCH_GPU_VRAM``
(a JSON list of MiB, one task per size), and each worker declares exactly those.
torch is imported inside the task, never at import: the worker's parent process must
not touch CUDA before it forks its pool, and machines without torch import this module.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

from celery import Celery

from benchmarks.work import record
from taskmesh.app.celery_app import BROKER_ENV, DEFAULT_BROKER, TaskmeshCelery, create_app

VRAM_ENV = "TASKMESH_BENCH_GPU_VRAM"
QUEUE = "gpu"  # taskmesh's GPU queue; the plain app uses the same name
OPTIONS = {"ignore_result": True, "shared": False, "time_limit": 600}
MATRIX = 4096  # fp16 operands of the compute loop: 32 MiB each, allocated before the big block


def task_name(index: int) -> str:
    return f"benchmarks.gpu_apps.gpu{index}"


def sizes_from_env() -> list[int]:
    """The declared sizes (MiB) the benchmark handed the workers; none outside a benchmark."""
    return [int(mib) for mib in json.loads(os.environ.get(VRAM_ENV) or "[]")]


def is_oom(exc: BaseException) -> bool:
    """A CUDA out-of-memory failure, whichever call ran into it (allocator, context, cuBLAS)."""
    text = str(exc)
    return type(exc).__name__ == "OutOfMemoryError" or "out of memory" in text or "ALLOC_FAILED" in text


def use_gpu(alloc_mib: int, seconds: float) -> tuple[str, str | None]:
    """Hold *alloc_mib* of device memory and keep the GPU computing for *seconds*, then
    give the memory back; returns ("ok" | "oom" | "error", the error's first line)."""
    import torch

    a = b = c = block = None
    try:
        a = torch.randn(MATRIX, MATRIX, device="cuda", dtype=torch.float16)
        b = torch.randn_like(a)
        c = torch.empty_like(a)
        torch.matmul(a, b, out=c)  # cuBLAS's workspace exists before the big block, so the loop allocates nothing
        block = torch.empty(alloc_mib * 2**20, dtype=torch.uint8, device="cuda")
        block.fill_(1)
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            for _ in range(20):
                torch.matmul(a, b, out=c)
            torch.cuda.synchronize()
        return "ok", None
    except Exception as exc:  # reported, never raised: both systems must see every task end the same way
        return ("oom" if is_oom(exc) else "error"), f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
    finally:
        a = b = c = block = None
        if torch.cuda.is_initialized():  # False where creating the CUDA context itself ran out of memory
            torch.cuda.empty_cache()


def gpu_task(task: Any, size: int, alloc_mib: int, seconds: float, label: Any = None) -> None:
    started = time.time()
    outcome, error = use_gpu(alloc_mib, seconds)
    record(task.app.conf.broker_url, "gpu", label, started, 0.0, [os.environ.get("CUDA_VISIBLE_DEVICES", "")],
           task.request.hostname, QUEUE, outcome=outcome, error=error, size=size, alloc_mib=alloc_mib)


def make_taskmesh_app(broker: str | None = None, sizes: list[int] | None = None) -> TaskmeshCelery:
    """One ``profile="gpu"`` task per size, each declaring its ``vram``."""
    app = create_app("benchmarks.gpu_apps", broker=broker)
    for index, mib in enumerate(sizes_from_env() if sizes is None else sizes):
        app.task(bind=True, name=task_name(index), profile="gpu", vram=f"{mib}MiB", **OPTIONS)(gpu_task)
    return app


def make_plain_app(broker: str | None = None, sizes: list[int] | None = None) -> Celery:
    """The same tasks on plain Celery, with taskmesh's prefetch and late acks, without admission."""
    app = Celery("benchmarks.gpu_apps", broker=broker or os.environ.get(BROKER_ENV) or DEFAULT_BROKER,
                 set_as_current=False)
    app.conf.update(task_default_queue=QUEUE, worker_prefetch_multiplier=1, task_acks_late=True)
    for index, _ in enumerate(sizes_from_env() if sizes is None else sizes):
        app.task(bind=True, name=task_name(index), **OPTIONS)(gpu_task)
    return app


taskmesh_app = make_taskmesh_app()
plain_app = make_plain_app()

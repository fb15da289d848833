"""Scenario 6: real GPUs — tasks of mixed sizes that allocate real device memory with
PyTorch and compute on it, under taskmesh's admission against the same tasks unguarded.

Each task holds a fraction of the GPU's memory (``gpu_apps``: ``torch.empty`` of its
size, then a matmul loop for ``seconds``) and declares that plus ``overhead_mib`` (its
CUDA context, the matmul operands, cuBLAS's workspace). Both systems get the same
workers: one per GPU with ``slots`` prefork processes, so up to ``slots`` tasks can
share a GPU at once. taskmesh (``taskmesh worker --profile gpu``, the real NVML
provider) starts a task only when its declared memory is free; plain Celery starts
whatever arrives, and a task that does not fit fails with CUDA out-of-memory.

Per system: tasks completed, out-of-memory failures, total time, the most tasks
running at once, and from NVML during the run the mean GPU utilisation and the memory
used (peak and mean, as a fraction of all GPUs' memory: how well the work was packed).
Skipped, with the reason, where there is no NVIDIA GPU, no torch, or no CUDA for torch.
"""

from __future__ import annotations

import collections
import json
import random
import socket
import time
from typing import Any

import redis

from benchmarks import gpu_apps
from benchmarks.harness import GpuSampler, LocalRedis, Processes, python_argv, wait_for_records, wait_for_workers
from benchmarks.scenario import Context, Result
from benchmarks.systems import start_taskmesh
from taskmesh.app.celery_app import BROKER_ENV
from taskmesh.core.gpus import SIMULATE_ENV, GpuInfo
from taskmesh.hardware.nvml import NvmlProvider

TITLE = "Real GPU: torch tasks allocating real memory, under admission and unguarded"
FULL: dict[str, Any] = {"fractions": [0.2, 0.3, 0.45], "tasks_per_size": 6, "seconds": 8.0, "slots": 4,
                        "overhead_mib": 1536, "seed": 7, "systems": ["taskmesh", "unguarded"]}
SMOKE: dict[str, Any] = {**FULL, "tasks_per_size": 1, "seconds": 1.0}
SYSTEMS = ("taskmesh", "unguarded")
TASKMESH_APP = "benchmarks.gpu_apps:taskmesh_app"
PLAIN_APP = "benchmarks.gpu_apps:plain_app"


def unavailable() -> str | None:
    """Why this machine cannot run the scenario, or ``None`` when it can."""
    provider = NvmlProvider()
    if provider.unavailable_reason:
        return f"no NVIDIA GPU to run on: {provider.unavailable_reason}"
    if not provider.snapshot():
        return "no NVIDIA GPU to run on: NVML found none"
    try:
        import torch
    except Exception as exc:  # ImportError, or a broken CUDA library under torch
        return f"torch is not importable ({type(exc).__name__}: {exc}); the real-GPU tasks need PyTorch with CUDA"
    if not torch.cuda.is_available():
        return (f"torch {torch.__version__} sees no CUDA GPU (torch.cuda.is_available() is False: a CPU-only "
                "build, or CUDA_VISIBLE_DEVICES hides the GPUs)")
    return None


def declared_sizes(params: dict[str, Any], total_mib: int) -> list[int]:
    """MiB each task size declares: its fraction of the smallest GPU's memory."""
    fractions, overhead = params["fractions"], params["overhead_mib"]
    if not fractions or any(not isinstance(f, (int, float)) or not 0.05 <= f <= 0.9 for f in fractions):
        raise ValueError(f"real_gpu.fractions={fractions!r}: give fractions of the GPU's memory between 0.05 "
                         "and 0.9, e.g. [0.2, 0.3, 0.45]")
    sizes = [round(total_mib * f) for f in fractions]
    if overhead >= min(sizes):
        raise ValueError(f"real_gpu.overhead_mib={overhead} leaves nothing to allocate in the smallest task "
                         f"({min(sizes)} MiB); lower it or raise the smallest fraction")
    unknown = set(params["systems"]) - set(SYSTEMS)
    if unknown or params["slots"] < 1:
        raise ValueError(f"real_gpu: systems must be among {list(SYSTEMS)} (got {sorted(unknown)}) and slots >= 1")
    return sizes


def workload(params: dict[str, Any]) -> list[tuple[int, int]]:
    """(size index, label) for every task, shuffled the same way for both systems."""
    sizes = [size for size in range(len(params["fractions"])) for _ in range(params["tasks_per_size"])]
    random.Random(params["seed"]).shuffle(sizes)
    return [(size, label) for label, size in enumerate(sizes)]


def run(params: dict[str, Any], ctx: Context) -> Result:
    reason = unavailable()
    if reason:
        return Result("real_gpu", TITLE, status="skipped", params=params, reason=reason)
    provider = NvmlProvider()
    gpus = provider.snapshot()
    total = min(g.memory_total_mib for g in gpus)
    sizes = declared_sizes(params, total)
    held = [mib - params["overhead_mib"] for mib in sizes]
    result = Result("real_gpu", TITLE, params=params)
    result.metrics.update(device=", ".join(sorted({g.name for g in gpus})) + f" x{len(gpus)}",
                          gpu_total_mib=[g.memory_total_mib for g in gpus],
                          used_before_mib=[g.memory_used_mib for g in gpus], declared_mib=sizes, held_mib=held)
    tasks = workload(params)
    runs: dict[str, dict[str, Any]] = {}
    with LocalRedis() as server:
        for system in params["systems"]:
            server.client().flushall()
            runs[system] = run_system(system, params, sizes, held, tasks, server.url, ctx, gpus, provider)
    result.rows = [{"system": system, **measured["row"]} for system, measured in runs.items()]
    result.metrics["runs"] = {system: measured["detail"] for system, measured in runs.items()}
    for system, measured in runs.items():
        result.metrics[f"{system}_completed"] = measured["row"]["completed"]
        result.metrics[f"{system}_oom"] = measured["row"]["oom"]
    result.target("taskmesh_completed", f">= {len(tasks)}")
    result.target("taskmesh_oom", "<= 0")
    result.notes.append(
        f"device {result.metrics['device']}; each task holds {held} MiB by size and declares {sizes} MiB "
        f"({params['fractions']} of {total} MiB, the held memory plus {params['overhead_mib']} MiB for its CUDA "
        f"context and matmul buffers); {params['slots']} prefork slots per GPU on both sides; the unguarded "
        "side is plain Celery (prefetch 1, late ack) with no admission")
    result.notes.append("the first task in each pool process also imports torch and creates its CUDA context, "
                        "on both sides; GPU utilisation is NVML's busy-time percent, averaged over the GPUs")
    if "unguarded" in runs and not runs["unguarded"]["row"]["oom"]:
        result.notes.append("the unguarded run had no out-of-memory failure: this mix did not oversubscribe "
                            "the GPU; raise real_gpu.slots, tasks_per_size or fractions")
    return result


def run_system(system: str, params: dict[str, Any], sizes: list[int], held: list[int], tasks: list[tuple[int, int]],
               broker: str, ctx: Context, gpus: tuple[GpuInfo, ...], provider: NvmlProvider) -> dict[str, Any]:
    logdir = ctx.logdir("real_gpu", system)
    # SIMULATE_ENV emptied: the real NVML provider, even where the caller's environment simulates GPUs
    env = {BROKER_ENV: broker, gpu_apps.VRAM_ENV: json.dumps(sizes), SIMULATE_ENV: "",
           "TASKMESH_GPU_SLOTS": str(params["slots"])}
    with Processes(logdir, env) as procs:
        if system == "taskmesh":
            app = gpu_apps.make_taskmesh_app(broker, sizes)
            nodes = [spec.nodename for spec in start_taskmesh(procs, app, ["gpu"], env, logdir, TASKMESH_APP)]
        else:
            app = gpu_apps.make_plain_app(broker, sizes)
            nodes = [start_unguarded(procs, gpu, params["slots"]) for gpu in gpus]
        wait_for_workers(app, nodes, procs)
        with GpuSampler(provider) as sampler:
            started = time.time()
            for size, label in tasks:
                app.tasks[gpu_apps.task_name(size)].apply_async((size, held[size], params["seconds"], label))
            records = wait_for_records(redis.Redis.from_url(broker), len(tasks),
                                       timeout=300 + 4 * params["seconds"] * len(tasks), procs=procs)
    return summarise(records, started, sampler, sum(g.memory_total_mib for g in gpus))


def start_unguarded(procs: Processes, gpu: GpuInfo, slots: int) -> str:
    """A plain ``celery worker`` pinned to *gpu*, as taskmesh pins its own; returns its node name."""
    node = f"unguarded{gpu.index}@{socket.gethostname()}"
    argv = python_argv("celery", "-A", PLAIN_APP, "worker", "-P", "prefork", "-c", str(slots), "-Q", gpu_apps.QUEUE,
                       "-n", node, "--loglevel", "WARNING")
    procs.start(f"unguarded{gpu.index}", argv, {"CUDA_VISIBLE_DEVICES": gpu.uuid, "CUDA_DEVICE_ORDER": "PCI_BUS_ID"})
    return node


def max_running(records: list[dict[str, Any]]) -> int:
    """The most tasks that were running at the same moment."""
    events = sorted([(r["started"], 1) for r in records] + [(r["ended"], -1) for r in records])
    running = most = 0
    for _, step in events:  # at equal times an end (-1) sorts before a start
        running += step
        most = max(most, running)
    return most


def summarise(records: list[dict[str, Any]], started: float, sampler: GpuSampler, total_mib: int) -> dict[str, Any]:
    end = max(r["ended"] for r in records)
    outcomes = collections.Counter(r["outcome"] for r in records)
    window = sampler.between(started, end)
    busy = [u for _, u, _ in window if u is not None]
    used = [mib for _, _, mib in window]
    row = {"tasks": len(records), "completed": outcomes["ok"], "oom": outcomes["oom"], "errors": outcomes["error"],
           "makespan_s": round(end - started, 1), "max_running": max_running(records),
           "gpu_util_mean": round(sum(busy) / len(busy) / 100, 3) if busy else None,
           "vram_peak": round(max(used) / total_mib, 3) if used else None,
           "vram_mean": round(sum(used) / len(used) / total_mib, 3) if used else None}
    failures = sorted({r["error"] for r in records if r["error"]})
    return {"row": row, "detail": {**row, "failures": failures[:10],
                                   "samples": [(round(t - started, 2), u, mib) for t, u, mib in sampler.samples]}}

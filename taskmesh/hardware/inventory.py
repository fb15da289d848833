"""This machine's inventory: CPU cores and threads, memory, and GPUs.

Detection (psutil, a ``GpuProvider``) fills whatever the config leaves out; what the
config states wins, so an operator can hand taskmesh less than the whole machine.
For GPUs the config can only narrow what exists: ``count`` keeps the first N,
``memory_gb`` caps what the ledger may hand out per GPU (headroom for others).

When a process can use no GPU, ``gpu_problem`` says why in words an operator can act
on (NVML missing, ``CUDA_VISIBLE_DEVICES`` naming nothing that exists, MIG instances):
the worker logs it at start, ``doctor`` prints it, and the worker's state carries it.
"""

from __future__ import annotations

import dataclasses
import logging
import os

import psutil

from taskmesh.core.config import Config
from taskmesh.core.gpus import GpuInfo, GpuProvider
from taskmesh.core.records import GpuRecord, WorkerRecord
from taskmesh.hardware.providers import provider_from_env

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Inventory:
    cpu_cores: int
    cpu_threads: int
    memory_total_mib: int
    gpus: tuple[GpuInfo, ...]
    gpu_source: str
    gpu_problem: str | None = None  # why this process may use no GPU, with the fix

    def describe(self) -> list[str]:
        lines = [
            f"CPU: {self.cpu_cores} cores, {self.cpu_threads} threads",
            f"memory: {self.memory_total_mib // 1024} GiB",
            f"GPUs ({self.gpu_source}): {len(self.gpus) or 'none'}",
        ]
        if self.gpu_problem:
            lines.append(f"WARNING: no usable GPU: {self.gpu_problem}. GPU tasks will not run on this machine")
        return lines + [f"  {gpu.describe()}" for gpu in self.gpus]


def detect(config: Config, provider: GpuProvider | None = None) -> Inventory:
    """Combine detection with the config; the config's explicit values win."""
    provider = provider or provider_from_env(config.simulate_gpus)
    gpus = provider.snapshot()
    if config.gpu_count is not None:
        gpus = gpus[: config.gpu_count]
    if config.gpu_memory_mib is not None:
        gpus = tuple(
            dataclasses.replace(g, memory_total_mib=min(g.memory_total_mib, config.gpu_memory_mib))
            for g in gpus
        )
    if config.gpu_model and gpus and any(config.gpu_model not in g.name for g in gpus if not g.simulated):
        log.warning("config says GPU model %r; detected %s", config.gpu_model, [g.name for g in gpus])
    source = getattr(provider, "unavailable_reason", None) or type(provider).__name__
    threads = config.cpu_threads or psutil.cpu_count(logical=True) or 1
    cores = config.cpu_cores or psutil.cpu_count(logical=False) or threads
    memory = config.memory_total_mib or psutil.virtual_memory().total // 2**20
    return Inventory(
        cpu_cores=cores,
        cpu_threads=max(threads, cores) if config.cpu_threads is None else threads,
        memory_total_mib=memory,
        gpus=gpus,
        gpu_source=source,
        gpu_problem=gpu_problem(provider, visible_gpu_uuids(provider)),
    )


def visible_gpu_uuids(provider: GpuProvider) -> tuple[str, ...] | None:
    """The GPUs ``CUDA_VISIBLE_DEVICES`` names, as UUIDs (``None``: it is not set)."""
    value = os.environ.get("CUDA_VISIBLE_DEVICES")
    if value is None:
        return None
    entries = [e.strip() for e in value.split(",") if e.strip()]
    gpus = provider.snapshot()
    return tuple(gpus[int(e)].uuid if e.isdigit() and int(e) < len(gpus) else e for e in entries)


def local_record(inventory: Inventory) -> WorkerRecord:
    """This machine as a worker record, for checks that compare a task with what is here."""
    gpus = tuple(GpuRecord(g.uuid, g.index, g.name, g.memory_total_mib, g.compute_capability, g.healthy)
                 for g in inventory.gpus)
    return WorkerRecord(node="doctor", incarnation="", host="", queues=(), gpus=gpus,
                        cpu_threads=inventory.cpu_threads, memory_total_mib=inventory.memory_total_mib)
def gpu_problem(provider: GpuProvider, visible: tuple[str, ...] | None) -> str | None:
    """Why this process may use none of the GPUs *provider* reports (*visible*: what
    ``CUDA_VISIBLE_DEVICES`` names), with the fix; ``None`` when it may use at least one."""
    found = provider.snapshot()
    unavailable = getattr(provider, "unavailable_reason", None)
    if unavailable:
        return (f"{unavailable}; install the NVIDIA driver and nvidia-ml-py (pip install 'taskmesh[gpu]'), "
                "or simulate GPUs with TASKMESH_SIMULATE_GPUS=1x24GiB")
    if not found:
        return f"{type(provider).__name__} reports no GPU on this machine"
    if visible is None or any(g.uuid in visible for g in found):
        return None
    value = os.environ.get("CUDA_VISIBLE_DEVICES", "")
    uuids = ", ".join(g.uuid for g in found)
    if not visible:
        return f"CUDA_VISIBLE_DEVICES={value!r} gives this process no GPU; unset it or name GPUs ({uuids})"
    mig = [e for e in visible if e.startswith("MIG-")]
    if mig:
        return (f"CUDA_VISIBLE_DEVICES names MIG instance(s) {', '.join(mig)}; taskmesh admits on whole GPUs "
                f"only: name whole GPUs by UUID ({uuids})")
    return (f"CUDA_VISIBLE_DEVICES={value!r} names no GPU found here (found: {uuids}); "
            "name GPUs by index or by UUID as nvidia-smi -L prints them")

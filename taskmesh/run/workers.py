"""Planning worker groups: which ``celery worker`` processes this hardware supports.

A plan is data (``WorkerSpec``), printed by ``--dry-run`` and started by the
supervisor, so what will run can be read before it runs.

Sizing rules, and why:

* ``gpu``: one worker per GPU with ``slots_per_gpu`` pool slots, pinned by UUID
  (``CUDA_VISIBLE_DEVICES=<uuid>``, ``CUDA_DEVICE_ORDER=PCI_BUS_ID``) because
  indices differ between NVML and CUDA. The default pool is prefork: the parent
  keeps its event loop (heartbeats, ``inspect``, admission timers) free during a
  long task, time limits work, CUDA lives only in the child, and a crashed child is
  replaced. ``threads`` also stays visible but cannot enforce time limits; ``solo``
  runs the task on the event loop, so the worker looks dead to Flower for the
  length of every task. Both remain selectable (``--gpu-pool``).
* ``cpu_intensive``: prefork sized to physical cores, reduced so that
  (processes x threads per task) plus the ``mixed`` group never exceeds the CPU
  thread budget; each child gets ``OMP_NUM_THREADS`` and friends set to the threads
  its tasks declare, so numeric libraries do not each spawn one thread per core.
* ``cpu_light``: gevent, started with ``-P gevent`` (the only way gevent works).
* ``mixed``: prefork that sees every GPU; admission decides per task.

GPU and I/O groups are not counted against the thread budget: their slots mostly
wait on a device or a socket.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
import sys
from collections.abc import Iterable

from taskmesh.core.config import Config
from taskmesh.core.nodes import node_name
from taskmesh.core.profiles import Profile
from taskmesh.hardware.inventory import Inventory

log = logging.getLogger(__name__)
GROUP_PROFILES = ("gpu", "cpu_intensive", "cpu_light", "mixed")
THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMEXPR_NUM_THREADS")
DEFAULT_POOLS = {"gpu": "prefork", "cpu_intensive": "prefork", "cpu_light": "gevent", "mixed": "prefork"}
DEFAULT_IO_CONCURRENCY = 100


class PlanError(ValueError):
    """The requested worker groups cannot run on this hardware."""


@dataclasses.dataclass(frozen=True)
class WorkerSpec:
    """One ``celery worker`` process to run."""

    group: str
    queue: str
    pool: str
    concurrency: int
    nodename: str
    env: tuple[tuple[str, str], ...] = ()

    def argv(self, app: str, loglevel: str = "INFO", extra: Iterable[str] = ()) -> list[str]:
        return [
            sys.executable, "-m", "celery", "-A", app, "worker",
            "-Q", self.queue, "-P", self.pool, "-c", str(self.concurrency),
            "-n", self.nodename, "--loglevel", loglevel, *extra,
        ]

    def environ(self, base: dict[str, str] | None = None) -> dict[str, str]:
        env = dict(os.environ if base is None else base)
        env.update(self.env)
        return env


def threads_per_task(tasks: Iterable[object], profile: Profile) -> int:
    """The most CPU threads any task of *profile* declares (1 when none declares)."""
    declared = [
        t.requirement.cpu_threads
        for t in tasks
        if getattr(t, "requirement", None) is not None and t.requirement.profile is profile
    ]
    return max(declared, default=1)


def plan_workers(
    config: Config,
    inventory: Inventory,
    profile: str = "all",
    tasks: Iterable[object] = (),
    gpu_pool: str | None = None,
    host: str | None = None,
) -> list[WorkerSpec]:
    """The worker processes for *profile* (one of ``GROUP_PROFILES`` or ``all``)."""
    wanted = GROUP_PROFILES if profile == "all" else (Profile.parse(profile).queue,)
    host = host or socket.gethostname()
    tasks = list(tasks)
    specs: list[WorkerSpec] = []
    gpus = [g for g in inventory.gpus if g.healthy]
    if "gpu" in wanted:
        if not gpus and profile != "all":
            raise PlanError(
                f"no GPUs found ({inventory.gpu_source}); install the NVIDIA driver and "
                "nvidia-ml-py, or simulate some with TASKMESH_SIMULATE_GPUS=1x24GiB"
            )
        pool = gpu_pool or config.queue("gpu").pool or DEFAULT_POOLS["gpu"]
        if pool == "gevent":
            raise PlanError("the gpu group cannot run on gevent; use prefork, threads or solo")
        slots = 1 if pool == "solo" else config.slots_per_gpu
        for gpu in gpus:
            specs.append(
                WorkerSpec(
                    group=f"gpu{gpu.index}",
                    queue="gpu",
                    pool=pool,
                    concurrency=slots,
                    nodename=node_name("gpu", host, gpu.index),
                    env=(("CUDA_VISIBLE_DEVICES", gpu.uuid), ("CUDA_DEVICE_ORDER", "PCI_BUS_ID")),
                )
            )
    mixed_cfg = config.queue("mixed")
    mixed = mixed_cfg.concurrency or 1
    mixed_threads = threads_per_task(tasks, Profile.MIXED)
    if "cpu_intensive" in wanted:
        per_task = threads_per_task(tasks, Profile.CPU_INTENSIVE)
        budget = inventory.cpu_threads - (mixed * mixed_threads if "mixed" in wanted else 0)
        fits = max(1, budget // per_task)
        cfg = config.queue("cpu_intensive")
        sized = min(inventory.cpu_cores, config.cpu_max_concurrent_tasks or inventory.cpu_cores, fits)
        if cfg.concurrency and cfg.concurrency > fits:
            log.warning(
                "queues.cpu_intensive.concurrency=%s x %s threads per task exceeds the CPU thread budget of %s; "
                "using %s (lower the concurrency or the tasks' cpu_threads)",
                cfg.concurrency, per_task, budget, fits,
            )
        specs.append(
            WorkerSpec(
                group="cpu",
                queue="cpu_intensive",
                pool=cfg.pool or DEFAULT_POOLS["cpu_intensive"],
                concurrency=min(cfg.concurrency, fits) if cfg.concurrency else sized,
                nodename=node_name("cpu", host),
                env=(("CUDA_VISIBLE_DEVICES", ""),) + tuple((name, str(per_task)) for name in THREAD_ENV),
            )
        )
    if "cpu_light" in wanted:
        cfg = config.queue("cpu_light")
        specs.append(
            WorkerSpec(
                group="io",
                queue="cpu_light",
                pool=cfg.pool or DEFAULT_POOLS["cpu_light"],
                concurrency=cfg.concurrency or DEFAULT_IO_CONCURRENCY,
                nodename=node_name("io", host),
                env=(("CUDA_VISIBLE_DEVICES", ""),),
            )
        )
    if "mixed" in wanted:
        specs.append(
            WorkerSpec(
                group="mixed",
                queue="mixed",
                pool=mixed_cfg.pool or DEFAULT_POOLS["mixed"],
                concurrency=mixed,
                nodename=node_name("mixed", host),
                env=(
                    ("CUDA_VISIBLE_DEVICES", ",".join(g.uuid for g in gpus)),
                    ("CUDA_DEVICE_ORDER", "PCI_BUS_ID"),
                )
                + tuple((name, str(mixed_threads)) for name in THREAD_ENV),
            )
        )
    return specs

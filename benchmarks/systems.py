"""Starting the two systems under comparison the way their users start them.

taskmesh: ``taskmesh -A benchmarks.tm_app worker --profile GROUP`` (the planner
sizes each group from the machine and config, simulated GPUs included). Baseline:
``celery -A benchmarks.plain_app worker -P prefork -c CORES`` on one queue.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from benchmarks.harness import Processes, python_argv
from benchmarks.plain_app import GPU_LOCKS_ENV, MODE_ENV, QUEUE
from taskmesh.app.celery_app import BROKER_ENV
from taskmesh.core.config import load_config
from taskmesh.hardware.inventory import detect
from taskmesh.run.workers import WorkerSpec, plan_workers

TASKMESH_APP = "benchmarks.tm_app"
PLAIN_APP = "benchmarks.plain_app"


@contextlib.contextmanager
def environ(env: dict[str, str]) -> Iterator[None]:
    """Set *env* in this process too, so the planner here sees what the workers see."""
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def taskmesh_env(broker: str, gpus: int = 0, gpu_slots: int = 1, gpu_memory: str = "24GiB") -> dict[str, str]:
    env = {BROKER_ENV: broker, "TASKMESH_GPU_SLOTS": str(gpu_slots)}
    if gpus:
        env["TASKMESH_SIMULATE_GPUS"] = f"{gpus}x{gpu_memory}"
    return env


def plan(app: Any, groups: Sequence[str]) -> list[WorkerSpec]:
    """What ``taskmesh worker --profile G`` will start for each group (call inside ``environ``)."""
    config = load_config()
    inventory = detect(config)
    return [spec for group in groups for spec in plan_workers(config, inventory, group, app.tasks.values())]


def start_taskmesh(procs: Processes, app: Any, groups: Sequence[str], env: dict[str, str],
                   logdir: Path, app_path: str = TASKMESH_APP) -> list[WorkerSpec]:
    """One ``taskmesh worker`` supervisor per group; returns the workers they start."""
    with environ(env):
        specs = plan(app, groups)
    for group in groups:
        argv = python_argv("taskmesh", "-A", app_path, "worker", "--profile", group, "--loglevel", "WARNING",
                           "--logdir", str(logdir / f"taskmesh-{group}"))
        procs.start(f"taskmesh-{group}", argv, env)
    return specs


def start_plain(procs: Processes, broker: str, concurrency: int, *, mode: str = "defaults", pool: str = "prefork",
                queue: str = QUEUE, name: str = "plain", gpu_locks: int = 1, extra: Sequence[str] = (),
                env: dict[str, str] | None = None) -> str:
    """A plain ``celery worker`` for the baseline app; returns its node name."""
    node = f"{name}@{socket.gethostname()}"
    argv = python_argv("celery", "-A", PLAIN_APP, "worker", "-P", pool, "-c", str(concurrency), "-Q", queue,
                       "-n", node, "--loglevel", "WARNING", *extra)
    procs.start(name, argv, {BROKER_ENV: broker, MODE_ENV: mode, GPU_LOCKS_ENV: str(gpu_locks), **(env or {})})
    return node


def start_celery_taskmesh(procs: Processes, broker: str, concurrency: int, *, pool: str = "prefork",
                          queue: str, name: str, extra: Sequence[str] = ()) -> str:
    """The taskmesh app under a plain ``celery worker`` command line (same pool as the baseline)."""
    node = f"{name}@{socket.gethostname()}"
    argv = python_argv("celery", "-A", TASKMESH_APP, "worker", "-P", pool, "-c", str(concurrency), "-Q", queue,
                       "-n", node, "--loglevel", "WARNING", *extra)
    procs.start(name, argv, {BROKER_ENV: broker, "CUDA_VISIBLE_DEVICES": ""})
    return node

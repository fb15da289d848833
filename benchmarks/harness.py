"""Real parts for the benchmarks: a Redis of their own, worker processes stopped by pid,
CPU sampling, and the machine line every result is stamped with.

Benchmarks measure against the same kind of parts the tests use — a ``redis-server``
on a free loopback port, real ``celery``/``taskmesh worker`` subprocesses — because a
speed-up measured against a mock says nothing about the system.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import platform
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Self

import psutil
import redis

from taskmesh.run.stack import free_port, redis_command, wait_for_redis
from taskmesh.run.supervisor import stop_process

DONE_KEY = "bench:done"


class LocalRedis:
    """``redis-server`` on a free loopback port for one scenario; stopped by its pid."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> LocalRedis:
        self.proc = subprocess.Popen(redis_command(self.port, None), stdout=subprocess.DEVNULL, start_new_session=True)
        wait_for_redis(self.url)
        return self

    def __exit__(self, *_: object) -> None:
        if self.proc is not None:
            stop_process(self.proc, grace_s=10)

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url)


class Processes:
    """Worker processes of one run, each logging to a file, all stopped by pid on exit."""

    def __init__(self, logdir: Path, env: dict[str, str]) -> None:
        self.logdir = logdir
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", **env}
        self.procs: list[subprocess.Popen[bytes]] = []
        logdir.mkdir(parents=True, exist_ok=True)

    def start(self, name: str, argv: Sequence[str], env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        with open(self.logdir / f"{name}.log", "ab") as log:
            proc = subprocess.Popen(
                list(argv), env={**self.env, **(env or {})}, stdout=log, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True,
            )
        self.procs.append(proc)
        return proc

    def check_alive(self) -> None:
        for proc in self.procs:
            if proc.poll() is not None:
                raise RuntimeError(f"{proc.args[:6]} exited with code {proc.returncode}; see logs in {self.logdir}")

    def __enter__(self) -> Processes:
        return self

    def __exit__(self, *_: object) -> None:
        for proc in reversed(self.procs):
            stop_process(proc)


def python_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", *args]


def wait_for_workers(app: Any, nodes: Sequence[str], procs: Processes, timeout: float = 120.0) -> None:
    """Return once every node answers ping; fail early if a worker process died."""
    waiting = set(nodes)
    deadline = time.monotonic() + timeout
    while waiting:
        procs.check_alive()
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"workers {sorted(waiting)} did not answer ping in {timeout:.0f}s; logs in {procs.logdir}")
        for reply in app.control.ping(destination=sorted(waiting), timeout=0.5) or []:
            waiting -= set(reply)


def wait_for_records(client: redis.Redis, count: int, timeout: float, procs: Processes | None = None,
                     key: str = DONE_KEY) -> list[dict[str, Any]]:
    """The JSON records benchmark tasks push when they end, once *count* have arrived."""
    deadline = time.monotonic() + timeout
    while client.llen(key) < count:
        if procs is not None:
            procs.check_alive()
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {client.llen(key)} of {count} tasks finished within {timeout:.0f}s")
        time.sleep(0.02)
    return [json.loads(raw) for raw in client.lrange(key, 0, -1)]


class Sampler:
    """Readings taken on a thread every ``period_s`` while its ``with`` block runs, each
    stored as (unix time, *what ``read`` returns)."""

    def __init__(self, period_s: float = 0.25) -> None:
        self.period_s = period_s
        self.samples: list[tuple[Any, ...]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=type(self).__name__, daemon=True)

    def read(self) -> tuple[Any, ...]:
        raise NotImplementedError

    def _run(self) -> None:
        self.read()  # a first reading, discarded: psutil's cpu_percent counts from the previous call
        while not self._stop.wait(self.period_s):
            self.samples.append((time.time(), *self.read()))

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()


class CpuSampler(Sampler):
    """System-wide CPU utilisation (psutil), as (unix time, percent)."""

    def read(self) -> tuple[float]:
        return (psutil.cpu_percent(interval=None),)

    def mean(self, start: float, end: float) -> float | None:
        """Mean percent over the sampling periods that lie wholly between *start* and *end*."""
        inside = [p for t, p in self.samples if start + self.period_s <= t <= end]
        return round(sum(inside) / len(inside), 1) if inside else None


class GpuSampler(Sampler):
    """Every GPU's NVML utilisation and memory used, as (unix time, mean utilisation
    percent over the GPUs or ``None``, MiB used on all GPUs together)."""

    def __init__(self, provider: Any, period_s: float = 0.25) -> None:
        super().__init__(period_s)
        self.provider = provider

    def read(self) -> tuple[float | None, int]:
        gpus = self.provider.snapshot()
        busy = [g.utilization_percent for g in gpus if g.utilization_percent is not None]
        return (sum(busy) / len(busy) if busy else None), sum(g.memory_used_mib for g in gpus)

    def between(self, start: float, end: float) -> list[tuple[Any, ...]]:
        return [sample for sample in self.samples if start <= sample[0] <= end]


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


@dataclasses.dataclass(frozen=True)
class Machine:
    """The machine line: what a figure was measured on, and how busy the machine was."""

    cpus: int
    physical_cores: int | None
    memory_gib: float
    gpu: str
    date: str
    python: str
    celery: str
    redis_server: str
    commit: str
    load_before: tuple[float, float, float]

    def line(self) -> str:
        load = ", ".join(f"{v:.2f}" for v in self.load_before)
        return (f"{self.cpus} CPUs ({self.physical_cores} physical), {self.memory_gib:.0f} GiB, GPU: {self.gpu}, "
                f"{self.date}, Python {self.python}, Celery {self.celery}, Redis {self.redis_server}, "
                f"commit {self.commit}, load average before {load}")


def machine() -> Machine:
    import celery

    from taskmesh.hardware.nvml import NvmlProvider

    gpus = NvmlProvider().snapshot()
    gpu = ", ".join(sorted({g.name for g in gpus})) + f" x{len(gpus)}" if gpus else "none"
    server = subprocess.run(["redis-server", "--version"], capture_output=True, text=True).stdout.split()
    version = next((part.split("=", 1)[1] for part in server if part.startswith("v=")), "?")
    root = Path(__file__).resolve().parents[1]
    commit = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
                            capture_output=True, text=True).stdout.strip() or "?"
    return Machine(
        cpus=len(os.sched_getaffinity(0)), physical_cores=psutil.cpu_count(logical=False),
        memory_gib=psutil.virtual_memory().total / 2**30, gpu=gpu,
        date=datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        python=platform.python_version(), celery=celery.__version__, redis_server=version, commit=commit,
        load_before=os.getloadavg(),
    )


def cores() -> int:
    """CPUs this process may run on: what a CPU-bound pool can use."""
    return len(os.sched_getaffinity(0))

"""What every chaos scenario stands on: a Redis, worker processes stopped by pid, the run
records of ``tests/apps/chaos_app.py`` counted into figures, and the GPU ledger check.

The same code serves the CI tests (the session's redis-server from ``tests/conftest.py``,
reduced sizes) and ``scripts/chaos`` (a Redis of its own, full sizes).
"""

from __future__ import annotations

import collections
import json
import subprocess
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import psutil
import redis

from benchmarks.harness import Processes, python_argv
from taskmesh.state.keys import LEDGER_PREFIX, UNACKED
from tests.apps import chaos_app
from tests.conftest import bind, queue_depth, wait_for_workers, wait_until

APP = "tests.apps.chaos_app"
QUEUES = ("gpu", "cpu_intensive", "cpu_light", "mixed")
#: Short enough for CI, and the lease must outlive two 2 s heartbeats (see tests/test_fencing.py).
FAST_FENCING = {"TASKMESH_RESERVATION_TTL_S": "6", "TASKMESH_DEAD_AFTER_S": "8"}


def unpooled(module: Any) -> Any:
    """Drop the connections *module*'s app keeps (broker pool, producers, result backend): a
    scenario's Redis is not the last one's, and a pooled connection would reach the old one."""
    app = module.app
    app._pool = None  # kombu keeps one pool per URL; the next use takes the one for the new URL
    app.amqp._producer_pool = None
    app._backend_cache = None
    app._local.__dict__.pop("backend", None)
    app._redis = None  # taskmesh's own client for the producer-side checks
    return module


class Rig:
    """One scenario's Redis URL, its worker processes (logs in *logdir*) and the chaos app bound to it."""

    def __init__(self, url: str, logdir: Path) -> None:
        self.url, self.logdir = url, logdir
        self.client = redis.Redis.from_url(url)
        self.client.flushdb()
        self.app = bind(unpooled(chaos_app), url)
        self.procs = Processes(logdir, {"TASKMESH_BROKER_URL": url})

    def __enter__(self) -> Rig:
        return self

    def __exit__(self, *_: object) -> None:
        self.procs.__exit__()

    def taskmesh_worker(self, name: str, profile: str, nodes: int, **env: str) -> subprocess.Popen[bytes]:
        """``taskmesh worker --profile PROFILE`` (its groups under one supervisor); returns once
        *nodes* workers answer ping."""
        proc = self.procs.start(name, python_argv("taskmesh", "-A", APP, "worker", "--profile", profile,
                                                  "--loglevel", "WARNING"), env)
        wait_until(lambda: len(self.nodes()) >= nodes, f"{nodes} workers answered ping", 180)
        return proc

    def celery_worker(self, name: str, queue: str, *extra: str, **env: str) -> subprocess.Popen[bytes]:
        node = f"{name}@chaos"
        proc = self.procs.start(name, python_argv("celery", "-A", APP, "worker", "-Q", queue, "-n", node,
                                                  "--loglevel", "WARNING", *extra), env)
        wait_for_workers(self.app.app, [node], timeout=180)
        return proc

    def nodes(self) -> set[str]:
        return {node for reply in self.app.app.control.ping(timeout=0.5) or [] for node in reply}

    def log(self, name: str) -> str:
        return (self.logdir / f"{name}.log").read_text(errors="replace")

    def records(self, key: str) -> list[dict[str, Any]]:
        return [json.loads(raw) for raw in self.client.lrange(key, 0, -1)]

    def running(self) -> list[dict[str, Any]]:
        """Runs that started and have not ended (nor died: a dead pid runs nothing)."""
        ended = collections.Counter((e["id"], e["retries"], e["pid"]) for e in self.records(chaos_app.ENDS))
        return [s for s in self.records(chaos_app.STARTS)
                if not ended[(s["id"], s["retries"], s["pid"])] and _alive(s["pid"])]

    def settled(self) -> bool:
        """Nothing waits in a queue and nothing is delivered unacknowledged: no further run can start."""
        return not self.client.hlen(UNACKED) and not any(queue_depth(self.client, q) for q in QUEUES)

    def ledger_reserved_mib(self) -> int:
        """MiB reserved over every GPU pool the ledger knows (expired entries swept first)."""
        from taskmesh.state.ledger import Ledger

        pools = sorted({key.decode()[len(LEDGER_PREFIX):] for key in self.client.scan_iter(f"{LEDGER_PREFIX}*")
                        if not key.decode().endswith(":expiry")})
        return sum(Ledger(self.client).used(pools).values())

    def running_vram_mib(self) -> int:
        """What the GPU tasks that run now declared (the ledger must show exactly this)."""
        sizes = {"gpu_job": 4096, "gpu_once": 4096, "gpu_big": 10240}
        return sum(sizes.get(r["name"], 0) for r in self.running())


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def count_runs(rig: Rig, sent: Iterable[str], once_names: Iterable[str] = ()) -> dict[str, int]:
    """Lost, duplicated and re-run tasks of *sent*, from the run records.

    *lost*: sent, never ran to its end. *duplicates*: further runs to the end of a task id
    that had already run to its end. *reruns*: runs started again after a run that did not
    end (its process was killed): at-least-once doing its job, not a duplicate.
    """
    sent = list(sent)
    once = set(once_names)
    starts = collections.Counter(s["id"] for s in rig.records(chaos_app.STARTS))
    ends = collections.Counter(e["id"] for e in rig.records(chaos_app.ENDS))
    names = {s["id"]: s["name"] for s in rig.records(chaos_app.STARTS)}
    duplicates = {task_id: ends[task_id] - 1 for task_id in sent if ends[task_id] > 1}
    return {
        "sent": len(sent),
        "lost": sum(1 for task_id in sent if not ends[task_id]),
        "duplicates": sum(duplicates.values()),
        "duplicates_once": sum(n for task_id, n in duplicates.items() if names.get(task_id) in once),
        "reruns": sum(max(0, starts[t] - max(ends[t], 1)) for t in sent),
    }



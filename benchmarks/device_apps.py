"""The tasks of scenario 10 (one simulated GPU): each takes its memory on a simulated
device that runs out, for every system alike.

The device is the hash that drives taskmesh's simulated GPUs (``SimulationControl``,
``used:0``): a task adds its memory there while it runs, and one that would take the
device past its capacity fails at once, as a CUDA allocation would ("CUDA out of
memory"). taskmesh's provider reads the same hash, so its gate sees running tasks'
memory as NVML would; plain Celery sees nothing. The tasks are registered on a taskmesh
app (each declares its ``vram``) and on a plain Celery app routed by task name
(``task_routes``) with late acks and prefetch 1 — plain Celery configured well.
"""

from __future__ import annotations

import os
import socket
import time
from typing import Any

import redis
from celery import Celery

from benchmarks.work import client, record
from taskmesh.app.celery_app import BROKER_ENV, DEFAULT_BROKER, TaskmeshCelery, create_app
from taskmesh.state.keys import simulation_key

QUEUE = "gpu"
SIZES_GIB = tuple(range(3, 19))  # one task per size; the scenario picks among them
DEVICE_MIB_ENV = "TASKMESH_BENCH_DEVICE_MIB"
OPTIONS = {"ignore_result": True, "shared": False, "time_limit": 600}


def task_name(gib: int) -> str:
    return f"benchmarks.device_apps.gib{gib}"


def take(conn: redis.Redis, key: str, mib: int, capacity: int) -> bool:
    """Add *mib* to the device's used memory unless that would exceed *capacity* (one transaction)."""

    def step(pipe: Any) -> bool:
        used = int(pipe.hget(key, "used:0") or 0)
        if used + mib > capacity:
            return False
        pipe.multi()
        pipe.hincrby(key, "used:0", mib)
        return True

    return conn.transaction(step, key, value_from_callable=True)


def device_task(task: Any, gib: int, seconds: float, label: Any = None) -> None:
    broker = task.app.conf.broker_url
    conn, key, mib = client(broker), simulation_key(socket.gethostname()), gib * 1024
    started = time.time()
    if take(conn, key, mib, int(os.environ.get(DEVICE_MIB_ENV) or 24 * 1024)):
        try:
            time.sleep(seconds)
        finally:
            conn.hincrby(key, "used:0", -mib)
        outcome, error = "ok", None
    else:
        outcome, error = "oom", f"CUDA out of memory: tried to allocate {gib} GiB"
    record(broker, "gpu", label, started, 0.0, [], task.request.hostname, QUEUE, outcome=outcome, error=error,
           size=gib)


def make_taskmesh_app(broker: str | None = None) -> TaskmeshCelery:
    app = create_app("benchmarks.device_apps", broker=broker)
    for gib in SIZES_GIB:
        app.task(bind=True, name=task_name(gib), profile="gpu", vram=f"{gib}GiB", **OPTIONS)(device_task)
    return app


def make_plain_app(broker: str | None = None) -> Celery:
    """Plain Celery configured well: routed by task name, late acks, prefetch 1."""
    app = Celery("benchmarks.device_apps", broker=broker or os.environ.get(BROKER_ENV) or DEFAULT_BROKER,
                 set_as_current=False)
    app.conf.update(task_routes={"benchmarks.device_apps.*": {"queue": QUEUE}}, task_acks_late=True,
                    worker_prefetch_multiplier=1, task_reject_on_worker_lost=True)
    for gib in SIZES_GIB:
        app.task(bind=True, name=task_name(gib), **OPTIONS)(device_task)
    return app


taskmesh_app = make_taskmesh_app()
plain_app = make_plain_app()

"""The baseline: what a team runs today — a plain ``celery.Celery`` app, one queue, a
prefork pool sized to the cores, and GPU tasks serialised by Redis locks (one per GPU
slot) so that they cannot oversubscribe a GPU. With ``TASKMESH_BENCH_PLAIN_ROUTES=typed``,
what a team that read Celery's routing docs runs: a queue per kind of work (``task_routes``
by task name), each with its own worker.

Two settings modes, chosen by ``TASKMESH_BENCH_PLAIN``:

* ``defaults`` — Celery's own defaults (prefetch 4, early ack), as most teams run it;
* ``matched`` — every setting ``create_app`` changes, copied over, minus taskmesh's
  queues and router, so that a comparison measures taskmesh's code, not its settings.
"""

from __future__ import annotations

import os
import time
from typing import Any

import redis
from celery import Celery

from benchmarks.work import burn_cpu, client, record
from taskmesh.app.celery_app import BROKER_ENV, DEFAULT_BROKER

MODE_ENV = "TASKMESH_BENCH_PLAIN"
ROUTES_ENV = "TASKMESH_BENCH_PLAIN_ROUTES"  # "typed": a queue per kind of work, routed by task name
TYPED_QUEUES = {"gpu": "plain_gpu", "cpu": "plain_cpu", "io": "plain_io"}
GPU_LOCKS_ENV = "TASKMESH_BENCH_GPU_LOCKS"
QUEUE = "plain"
NAMES = {kind: f"benchmarks.plain_app.{kind}" for kind in ("gpu", "cpu", "io", "noop_cpu", "noop_io")}
OPTIONS = {"ignore_result": True, "shared": False}
NOT_MATCHED = ("task_routes", "task_queues", "task_default_queue")


def matched_settings(broker: str) -> dict[str, Any]:
    """The settings in which a finalized taskmesh app differs from a plain Celery app."""
    from benchmarks.tm_app import make_app

    taskmesh, plain = make_app(broker), Celery(broker=broker)
    taskmesh.finalize()
    return {k: v for k, v in taskmesh.conf.items() if k not in NOT_MATCHED and plain.conf.get(k) != v}


def acquire_gpu(redis_client: redis.Redis, locks: int, hold_s: float) -> tuple[str, Any]:
    """Spin (as the pool slot's task) until one of *locks* GPU locks is free."""
    while True:
        for index in range(locks):
            lock = redis_client.lock(f"bench:gpu-lock:{index}", timeout=hold_s + 60)
            if lock.acquire(blocking=False):
                return f"lock{index}", lock
        time.sleep(0.01)


def make_app(broker: str | None = None, mode: str | None = None) -> Celery:
    broker = broker or os.environ.get(BROKER_ENV) or DEFAULT_BROKER
    mode = mode or os.environ.get(MODE_ENV, "defaults")
    if mode not in ("defaults", "matched"):
        raise ValueError(f"{MODE_ENV}={mode!r}: use 'defaults' or 'matched'")
    app = Celery("benchmarks.plain_app", broker=broker, set_as_current=False)
    if mode == "matched":
        app.conf.update(matched_settings(broker))
    app.conf.task_default_queue = QUEUE
    if os.environ.get(ROUTES_ENV) == "typed":
        app.conf.task_routes = {NAMES[kind]: {"queue": queue} for kind, queue in TYPED_QUEUES.items()}

    def done(task: Any, kind: str, label: Any, started: float, cpu_s: float = 0.0, gpus: list[str] = ()) -> None:
        request = task.request
        record(app.conf.broker_url, kind, label, started, cpu_s, list(gpus), request.hostname,
               (request.delivery_info or {}).get("routing_key"))

    @app.task(bind=True, name=NAMES["gpu"], **OPTIONS)
    def gpu(self: Any, seconds: float, label: Any = None) -> None:
        locks = int(os.environ.get(GPU_LOCKS_ENV, "1"))
        name, lock = acquire_gpu(client(app.conf.broker_url), locks, seconds)
        started = time.time()
        try:
            time.sleep(seconds)
        finally:
            lock.release()
        done(self, "gpu", label, started, gpus=[name])

    @app.task(bind=True, name=NAMES["cpu"], **OPTIONS)
    def cpu(self: Any, seconds: float, label: Any = None) -> None:
        started = time.time()
        done(self, "cpu", label, started, burn_cpu(seconds))

    @app.task(bind=True, name=NAMES["io"], **OPTIONS)
    def io(self: Any, seconds: float, label: Any = None) -> None:
        started = time.time()
        time.sleep(seconds)
        done(self, "io", label, started)

    @app.task(name=NAMES["noop_cpu"], **OPTIONS)
    def noop_cpu() -> None:
        """Nothing, like taskmesh's no-op."""

    @app.task(name=NAMES["noop_io"], **OPTIONS)
    def noop_io() -> None:
        """Nothing, like taskmesh's no-op."""

    return app


app = make_app()

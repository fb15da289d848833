"""The batching benchmark's two apps: taskmesh batch tasks (``batch_size`` 1, 8, 32) and a
plain Celery task, one item per task; both bodies cost ``a + b·n`` for *n* items
(``TASKMESH_BENCH_A_S``, ``TASKMESH_BENCH_B_S``), a fixed per-call cost as a GPU forward pass has.

Each item is the time it was sent; each body pushes ``[sent, ended]`` per item to
``bench:batch-latency``, so the scenario reads throughput and item latency alike.
Workers import ``benchmarks.batch_apps:tm`` or ``benchmarks.batch_apps:plain``.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

from celery import Celery

from benchmarks.work import client
from taskmesh.app.celery_app import BROKER_ENV, DEFAULT_BROKER, create_app

LATENCY_KEY = "bench:batch-latency"
SIZES = (1, 8, 32)
BATCH_WAIT = "50ms"
PLAIN_QUEUE = "plain.batching"


def cost(items: int) -> float:
    return float(os.environ.get("TASKMESH_BENCH_A_S", "0.02")) + float(os.environ.get("TASKMESH_BENCH_B_S", "0.001")) \
        * items


def _record(broker_url: str, sent: list[float]) -> None:
    ended = time.time()
    client(broker_url).rpush(LATENCY_KEY, *[json.dumps([s, ended]) for s in sent])


def make_tm(broker: str | None = None) -> Any:
    app = create_app("benchmarks.batch_apps", broker=broker or os.environ.get(BROKER_ENV) or DEFAULT_BROKER)

    def declare(size: int) -> None:
        @app.task(name=f"benchmarks.batch_apps.batch{size}", profile="gpu", vram="2GiB", batch_size=size,
                  batch_wait=BATCH_WAIT, time_limit=600, shared=False)
        def run(items: list[float]) -> list[None]:
            time.sleep(cost(len(items)))
            _record(app.conf.broker_url, items)
            return [None] * len(items)

    for size in SIZES:
        declare(size)
    return app


def make_plain(broker: str | None = None) -> Celery:
    app = Celery("benchmarks.batch_apps", broker=broker or os.environ.get(BROKER_ENV) or DEFAULT_BROKER,
                 set_as_current=False)
    app.conf.update(result_backend=app.conf.broker_url, task_acks_late=True, worker_prefetch_multiplier=1,
                    task_default_queue=PLAIN_QUEUE, task_serializer="json", accept_content=["json"])

    @app.task(name="benchmarks.batch_apps.plain", shared=False)
    def one(sent: float) -> None:
        time.sleep(cost(1))
        _record(app.conf.broker_url, [sent])

    return app


tm = make_tm()
plain = make_plain()

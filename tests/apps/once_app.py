"""Tasks for the run-once tests: every run is recorded in Redis, with once=True and without."""

from __future__ import annotations

import time

import redis

from taskmesh import create_app

app = create_app("tests.apps.once_app")
RUNS = "test:once-runs"


def _run(task, seconds: float) -> str:
    redis.Redis.from_url(app.conf.broker_url).rpush(RUNS, task.request.id)
    time.sleep(seconds)
    return task.request.id


@app.task(bind=True, profile="cpu_intensive", once=True, time_limit=120)
def once_job(self, seconds: float = 0.2) -> str:
    return _run(self, seconds)


@app.task(bind=True, profile="cpu_intensive", time_limit=120)
def plain_job(self, seconds: float = 0.2) -> str:
    return _run(self, seconds)


@app.task(bind=True, profile="gpu", vram="20GiB", once=True, time_limit=120)
def big_gpu_once(self, seconds: float = 0.2) -> str:
    return _run(self, seconds)

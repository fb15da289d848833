"""Tasks for the chaos suite: one per profile, with ``once=True`` and without, plus poison
tasks and a long one. Every run writes a start and an end record to Redis (the side
channel that makes lost and doubled runs countable): ``{"id", "name", "node", "pid",
"retries", "t"}`` pushed on ``STARTS`` before the work and on ``ENDS`` after it.

A task whose pool process is killed is retried (``task_retry_on_worker_lost``) after
``default_retry_delay``: 1 s here rather than Celery's 180 s, so a run ends in CI time."""

from __future__ import annotations

import json
import os
import signal
import time
from typing import Any

import redis

from taskmesh import create_app

app = create_app("tests.apps.chaos_app")
STARTS, ENDS = "chaos:starts", "chaos:ends"
VRAM_MIB = {"gpu": 4096}  # what each profile's tasks declare, for the ledger check


def _record(task: Any, key: str) -> None:
    request = task.request
    entry = {"id": request.id, "name": task.name.rsplit(".", 1)[-1], "node": request.hostname,
             "pid": os.getpid(), "retries": request.retries, "t": time.time()}
    deadline = time.monotonic() + 60
    while True:  # the record must not be what fails while Redis restarts
        try:
            redis.Redis.from_url(app.conf.broker_url).rpush(key, json.dumps(entry))
            return
        except redis.ConnectionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def _work(task: Any, seconds: float) -> str:
    _record(task, STARTS)
    time.sleep(seconds)
    _record(task, ENDS)
    return task.request.id


@app.task(bind=True, profile="gpu", vram="4GiB", time_limit=120, default_retry_delay=1)
def gpu_job(self, seconds: float = 0.2) -> str:
    return _work(self, seconds)


@app.task(bind=True, profile="gpu", vram="4GiB", time_limit=120, once=True, default_retry_delay=1)
def gpu_once(self, seconds: float = 0.2) -> str:
    return _work(self, seconds)


@app.task(bind=True, profile="cpu_intensive", time_limit=120, default_retry_delay=1)
def cpu_job(self, seconds: float = 0.2) -> str:
    return _work(self, seconds)


@app.task(bind=True, profile="cpu_intensive", time_limit=120, once=True, default_retry_delay=1)
def cpu_once(self, seconds: float = 0.2) -> str:
    return _work(self, seconds)


@app.task(bind=True, profile="io", time_limit=120, default_retry_delay=1)
def io_job(self, seconds: float = 0.2) -> str:
    return _work(self, seconds)


@app.task(bind=True, profile="io", time_limit=120, once=True, default_retry_delay=1)
def io_once(self, seconds: float = 0.2) -> str:
    return _work(self, seconds)


@app.task(bind=True, profile="mixed", time_limit=120, default_retry_delay=1)
def mixed_job(self, seconds: float = 0.2) -> str:
    return _work(self, seconds)


@app.task(bind=True, profile="mixed", time_limit=120, once=True, default_retry_delay=1)
def mixed_once(self, seconds: float = 0.2) -> str:
    return _work(self, seconds)


@app.task(bind=True, profile="gpu", vram="10GiB", time_limit=120, default_retry_delay=1)
def gpu_big(self, seconds: float = 0.2) -> str:
    """10 GiB: two fill most of a simulated 24 GiB GPU, so the rest is held."""
    return _work(self, seconds)


@app.task(bind=True, profile="cpu_intensive", time_limit=7200)
def long_job(self, seconds: float = 5.0) -> str:
    """A two-hour time limit: taskmesh derives a visibility timeout of 2 x 7200 + 300 s."""
    return _work(self, seconds)


@app.task(bind=True, profile="cpu_intensive", time_limit=60, max_retries=2, default_retry_delay=0)
def kills_itself(self) -> None:
    _record(self, STARTS)
    os.kill(os.getpid(), signal.SIGKILL)


@app.task(bind=True, profile="cpu_intensive", time_limit=60)
def always_raises(self) -> None:
    _record(self, STARTS)
    raise RuntimeError("this task always fails")


#: The eight tasks of the kill scenario: every profile, with and without once=True.
MIXTURE = [gpu_job, gpu_once, cpu_job, cpu_once, io_job, io_once, mixed_job, mixed_once]


@app.task(bind=True, profile="cpu_intensive", time_limit=60)
def measure(self, value: Any) -> int:
    """How many characters *value* takes as JSON: the bad-input tests send odd arguments."""
    _record(self, STARTS)
    return len(json.dumps(value))

"""GPU tasks of declared sizes for the admission tests; every run is recorded in Redis."""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any

from taskmesh import create_app
from taskmesh.app.placement import current_placement
from taskmesh.core.claims import gpu_pool
from taskmesh.state.ledger import Ledger

#: A host whose clock is off: every ``time.time()`` in this worker process reads this far from the truth.
CLOCK_SKEW_S = float(os.environ.get("TASKMESH_TEST_CLOCK_SKEW_S") or 0)
if CLOCK_SKEW_S:
    _true_time = time.time
    time.time = lambda: _true_time() + CLOCK_SKEW_S

app = create_app("tests.apps.gpu_app")
RUNS = "test:runs"


def _run(task: Any, seconds: float, label: Any) -> dict[str, Any]:
    started = time.time()
    client = app.redis()
    client.rpush(RUNS, task.request.id)
    time.sleep(seconds)
    redelivered = bool((task.request.delivery_info or {}).get("redelivered"))
    return {**dataclasses.asdict(current_placement()), "label": label, "started": started, "ended": time.time(),
            "redelivered": redelivered}


@app.task(bind=True, profile="gpu", vram="10GiB", time_limit=120)
def ten_gib(self, seconds: float = 0.5, label: Any = None) -> dict[str, Any]:
    return _run(self, seconds, label)


@app.task(bind=True, profile="gpu", vram="20GiB", time_limit=120)
def twenty_gib(self, seconds: float = 0.5, label: Any = None) -> dict[str, Any]:
    return _run(self, seconds, label)


@app.task(bind=True, profile="gpu", vram="2GiB", time_limit=120)
def two_gib(self, seconds: float = 0.5, label: Any = None) -> dict[str, Any]:
    return _run(self, seconds, label)


@app.task(bind=True, profile="gpu", vram="40GiB", time_limit=120)
def forty_gib(self, seconds: float = 0.5, label: Any = None) -> dict[str, Any]:
    return _run(self, seconds, label)


@app.task(bind=True, profile="gpu", vram="1GiB", min_compute_capability="9.0", time_limit=120)
def hopper_only(self, seconds: float = 0.5, label: Any = None) -> dict[str, Any]:
    return _run(self, seconds, label)


@app.task(bind=True, profile="gpu", vram="10GiB", fallback="cpu_intensive", time_limit=120)
def flexible(self, seconds: float = 0.5, label: Any = None) -> dict[str, Any]:
    return _run(self, seconds, label)


@app.task(bind=True, profile="cpu_intensive", cpu_threads=1, time_limit=120)
def crunch(self, seconds: float = 0.5, label: Any = None) -> dict[str, Any]:
    return _run(self, seconds, label)


@app.task(bind=True, profile="mixed", time_limit=120)
def blend(self, seconds: float = 0.5, label: Any = None) -> dict[str, Any]:
    return _run(self, seconds, label)


@app.task(bind=True, profile="gpu", vram="4GiB", time_limit=300)
def progressing(self, steps: int, seconds_per_step: float) -> int:
    """Reports progress after each step, for taskmesh status and top."""
    for step in range(1, steps + 1):
        time.sleep(seconds_per_step)
        self.progress(step, steps)
    return steps


@app.task(bind=True, profile="gpu", vram="10GiB", time_limit=120)
def fails(self, seconds: float = 0.1) -> None:
    _run(self, seconds, None)
    raise RuntimeError("this task fails on purpose")


@app.task(bind=True, profile="gpu", vram="10GiB", time_limit=120)
def retries_once(self, seconds: float = 0.3, countdown: float = 0) -> dict[str, Any]:
    """Asks for a retry *countdown* seconds later; the retried run takes *seconds* and then
    reports what its GPU had reserved."""
    if not self.request.retries:
        _run(self, 0.0, 0)
        raise self.retry(countdown=countdown)
    ran = _run(self, seconds, 1)
    pool = gpu_pool(ran["gpu_uuids"][0])
    return {**ran, "reserved_mib": Ledger(app.redis()).used([pool])[pool]}


@app.task(bind=True, profile="gpu", vram="10GiB", rate_limit="6/m", time_limit=120)
def rate_limited(self, seconds: float = 0.5, label: Any = None) -> dict[str, Any]:
    """At most one start per ten seconds on a worker (Celery's token bucket)."""
    return _run(self, seconds, label)


@app.task(bind=True, profile="gpu", vram="10GiB", time_limit=0.3)
def overruns(self, seconds: float = 30.0) -> dict[str, Any]:
    """Killed by its hard time limit long before it would end."""
    return _run(self, seconds, None)


@app.task(bind=True, profile="gpu", vram="4GiB", gpus=2, time_limit=120)
def two_gpus(self, seconds: float = 0.2, label: Any = None) -> dict[str, Any]:
    """Needs two GPUs at once: only a worker that sees two may run it."""
    return _run(self, seconds, label)

"""Poison tasks for the dead-letter tests: one that raises until a flag is set, one that
kills its own process every time. Every run is recorded in Redis."""

from __future__ import annotations

import os
import signal

import redis

from taskmesh import create_app

app = create_app("tests.apps.poison_app")
RUNS = "test:poison-runs"
FIXED = "test:poison-fixed"


def _client() -> redis.Redis:
    return redis.Redis.from_url(app.conf.broker_url)


@app.task(bind=True, profile="cpu_intensive", time_limit=60)
def fails_until_fixed(self, word: str) -> str:
    _client().rpush(RUNS, self.request.id)
    if not _client().exists(FIXED):
        raise RuntimeError(f"cannot handle {word!r} yet")
    return word.upper()


@app.task(bind=True, profile="cpu_intensive", time_limit=60, max_retries=2, default_retry_delay=0)
def kills_its_process(self) -> None:
    _client().rpush(RUNS, self.request.id)
    os.kill(os.getpid(), signal.SIGKILL)

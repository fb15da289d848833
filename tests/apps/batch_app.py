"""Batch tasks for the micro-batching tests; every call of a batch function is recorded in Redis."""

from __future__ import annotations

import json
import time
from typing import Any

import redis

from taskmesh import RetryItem, create_app

app = create_app("tests.apps.batch_app")
CALLS = "test:batch-calls"  # one JSON list of the items per call
GATE = "test:batch-gate"  # blocking batches wait until this key exists
RUNS = "test:cached-runs"


def _record(items: list[Any]) -> None:
    redis.Redis.from_url(app.conf.broker_url).rpush(CALLS, json.dumps(items))


@app.task(profile="gpu", vram="2GiB", vram_per_item="64MiB", batch_size=32, batch_wait="2s", time_limit=60)
def square(items: list[int]) -> list[Any]:
    _record(items)
    return [x * x if x >= 0 else ValueError(f"negative item {x}") for x in items]


@app.task(profile="gpu", vram="2GiB", batch_size=32, batch_wait="60s", time_limit=60)
def slow_to_fill(items: list[str]) -> list[str]:
    _record(items)
    return [f"done {item}" for item in items]


@app.task(profile="gpu", vram="1GiB", batch_size=8, batch_wait="2s", time_limit=120)
def gated(items: list[int]) -> list[int]:
    """Blocks until the test opens its gate (``GATE``; ``GATE:1`` for items from 100, ``GATE:2`` from 200 ...):
    a batch known to be running."""
    _record(items)
    client = redis.Redis.from_url(app.conf.broker_url)
    gate = f"{GATE}:{min(items) // 100}" if min(items) >= 100 else GATE
    deadline = time.monotonic() + 90
    while not client.exists(gate) and time.monotonic() < deadline:
        time.sleep(0.05)
    return [x + 1000 for x in items]


@app.task(profile="cpu_intensive", cache_ttl="5m", time_limit=60)
def cached_double(x: int) -> int:
    redis.Redis.from_url(app.conf.broker_url).rpush(RUNS, x)
    return 2 * x


@app.task(profile="gpu", vram="1GiB", batch_size=4, batch_wait="100ms", time_limit=1.5)
def too_slow(items: list[int]) -> list[int]:
    _record(items)
    time.sleep(30)
    return items


@app.task(profile="gpu", vram="1GiB", batch_size=8, batch_wait="100ms", time_limit=60)
def total(items: list[list[int]]) -> list[int]:
    """Each item is a list (a chord's results): its sum."""
    return [sum(item) for item in items]


@app.task(profile="gpu", vram="1GiB", batch_size=8, batch_wait="300ms", max_retries=2, time_limit=60)
def flaky(items: list[int]) -> list[Any]:
    """Odd items ask to run again once; 99 asks every time, until max_retries fails it."""
    _record(items)
    client = redis.Redis.from_url(app.conf.broker_url)
    out: list[Any] = []
    for x in items:
        tries = client.incr(f"test:flaky:{x}")
        if x == 99:
            out.append(RetryItem(ValueError("item 99 never works"), countdown=0.2))
        elif x % 2 and tries == 1:
            out.append(RetryItem(countdown=0.2))
        else:
            out.append(x * 10)
    return out

"""What benchmark tasks do, shared by the taskmesh app and the plain Celery baseline so
both run exactly the same work.

CPU work is measured in CPU seconds of the process (``time.process_time``), not wall
time: a task asked for one second of CPU does one second of hashing however busy the
machine is, so contention shows up as longer runs instead of less work.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from typing import Any

import redis

from benchmarks.harness import DONE_KEY

_clients: dict[str, redis.Redis] = {}


def burn_cpu(seconds: float) -> float:
    """Hash until this process has used *seconds* of CPU; returns the CPU seconds used."""
    start = time.process_time()
    digest = b"taskmesh"
    while time.process_time() - start < seconds:
        for _ in range(500):
            digest = hashlib.sha256(digest).digest()
    return time.process_time() - start


def client(broker_url: str) -> redis.Redis:
    """One Redis client per broker per process (redis-py reconnects after a fork)."""
    found = _clients.get(broker_url)
    if found is None:
        found = _clients[broker_url] = redis.Redis.from_url(broker_url)
    return found


def record(broker_url: str, kind: str, label: Any, started: float, cpu_s: float, gpus: list[str],
           node: str | None, queue: str | None, **extra: Any) -> None:
    """Push what ran where and when (and any *extra* fields) to the list the benchmark waits on."""
    client(broker_url).rpush(DONE_KEY, json.dumps({
        "kind": kind, "label": label, "started": started, "ended": time.time(), "cpu_s": cpu_s,
        "gpus": gpus, "node": node, "queue": queue, "pid": os.getpid(), **extra,
    }))

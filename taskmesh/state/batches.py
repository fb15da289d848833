"""Batch jobs, batch statistics and cached results, in Redis.

A batch job is a hash (task, total, created, cancelled) and the list of its task ids;
its progress is read from the result backend's own records (one ``MGET`` per thousand
items), so it counts each item once however often it was delivered, and needs nothing
from workers. Statistics of micro-batches (calls, items, seconds, a size histogram)
are added up per task by the worker process that ran each batch. Cached results are
JSON under a key per task and argument digest, expiring with the task's ``cache_ttl``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Iterator
from typing import Any

import redis

from taskmesh.state.keys import BATCH_JOB_PREFIX, BATCH_JOBS, BATCH_STATS, CACHE_PREFIX, COUNTERS

SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)  # the batch size histogram's upper bounds; then +Inf
CHUNK = 1000
ENDED = {"SUCCESS": "done", "FAILURE": "failed", "REVOKED": "revoked"}


def create_job(client: redis.Redis, batch_id: str, task: str, task_ids: list[str], ttl_s: int) -> None:
    key = BATCH_JOB_PREFIX + batch_id
    with client.pipeline() as pipe:
        pipe.hset(key, mapping={"task": task, "total": len(task_ids), "created": time.time(), "cancelled": 0})
        if task_ids:
            pipe.rpush(key + ":ids", *task_ids)
        pipe.expire(key, ttl_s)
        pipe.expire(key + ":ids", ttl_s)
        pipe.zadd(BATCH_JOBS, {batch_id: time.time()})
        pipe.zremrangebyscore(BATCH_JOBS, "-inf", time.time() - ttl_s)  # their records are gone too
        pipe.execute()


def newest_jobs(client: redis.Redis, count: int) -> list[str]:
    """The ids of the *count* batch jobs submitted last, newest first."""
    return [raw.decode() for raw in client.zrevrange(BATCH_JOBS, 0, count - 1)]


def job(client: redis.Redis, batch_id: str) -> tuple[dict[str, str], list[str]] | None:
    """The job's record and task ids, or ``None`` when there is no such batch."""
    key = BATCH_JOB_PREFIX + batch_id
    record = {k.decode(): v.decode() for k, v in client.hgetall(key).items()}
    if not record:
        return None
    return record, [i.decode() for i in client.lrange(key + ":ids", 0, -1)]


def mark_cancelled(client: redis.Redis, batch_id: str) -> None:
    client.hset(BATCH_JOB_PREFIX + batch_id, "cancelled", time.time())


def result_states(client: redis.Redis, keys: list[str]) -> Iterator[str]:
    """The state in each result record (``PENDING`` when there is none yet)."""
    for start in range(0, len(keys), CHUNK):
        for raw in client.mget(keys[start:start + CHUNK]):
            try:
                yield str(json.loads(raw).get("status")) if raw else "PENDING"
            except (ValueError, AttributeError):
                yield "PENDING"


def job_progress(record: dict[str, str], states: Iterable[str], now: float | None = None) -> dict[str, Any]:
    """Total, done, failed, revoked, progress (0..1) and an ETA: elapsed / ended × what is left."""
    states = list(states)
    total = int(record.get("total", len(states)))
    ended = {name: sum(1 for s in states if ENDED.get(s) == name) for name in ENDED.values()}
    finished = sum(ended.values())
    elapsed = max(0.0, (time.time() if now is None else now) - float(record.get("created", 0)))
    left = total - finished
    return {
        "task": record.get("task"), "total": total, **ended, "running_or_waiting": left,
        "progress": finished / total if total else 1.0,
        "elapsed_s": round(elapsed, 3),
        "eta_s": round(elapsed / finished * left, 3) if finished and left else (0.0 if not left else None),
        "cancelled": float(record.get("cancelled") or 0) > 0,
    }


def size_bucket(size: int) -> str:
    return next((str(b) for b in SIZE_BUCKETS if size <= b), "inf")


def record_batch(client: redis.Redis, task: str, size: int, seconds: float, fill_s: float = 0.0) -> None:
    """One batch of *size* items of *task* ran for *seconds*, after its first item had waited
    *fill_s* in the worker for the rest to arrive."""
    with client.pipeline(transaction=False) as pipe:
        pipe.hincrby(BATCH_STATS, f"{task}|calls", 1)
        pipe.hincrby(BATCH_STATS, f"{task}|items", size)
        pipe.hincrbyfloat(BATCH_STATS, f"{task}|seconds", seconds)
        pipe.hincrbyfloat(BATCH_STATS, f"{task}|fill_seconds", fill_s)
        pipe.hincrby(BATCH_STATS, f"{task}|size_le_{size_bucket(size)}", 1)
        pipe.execute()


def batch_stats(client: redis.Redis) -> dict[str, dict[str, float]]:
    """Task → {"calls", "items", "seconds", "fill_seconds", "size_le_<n>"...}."""
    out: dict[str, dict[str, float]] = {}
    for field, value in client.hgetall(BATCH_STATS).items():
        task, _, name = field.decode().rpartition("|")
        out.setdefault(task, {})[name] = float(value)
    return out


def cached(client: redis.Redis, task: str, digest: str) -> tuple[bool, Any]:
    """(found, value) for a call of *task* whose arguments have *digest*; counts the hit or miss."""
    raw = client.get(f"{CACHE_PREFIX}{task}:{digest}")
    client.hincrby(COUNTERS, "cache_hits" if raw is not None else "cache_misses", 1)
    return (True, json.loads(raw)) if raw is not None else (False, None)


def remember(client: redis.Redis, task: str, digest: str, value: Any, ttl_s: float) -> bool:
    """Store *value* for the TTL; ``False`` (not stored) when it is not JSON."""
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        return False
    client.set(f"{CACHE_PREFIX}{task}:{digest}", text, px=max(1, int(ttl_s * 1000)))
    return True

"""The worker registry: which workers exist, with what hardware, and which are alive.

Every worker with the admission step announces itself every couple of seconds:
its node name, host, queues and GPUs (UUID, memory, compute capability, health),
and the delivery tags of the messages it holds. Producers read it to refuse a task
no hardware can ever run; the step reads it to find workers that died holding
messages, so those are delivered again now rather than after Redis's visibility
timeout (an hour or more for long GPU tasks).

"Seen" is kept far longer than "alive" on purpose: hardware scaled to zero a minute
ago still exists for deciding whether a requirement is feasible.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Iterable
from typing import Any

import redis

from taskmesh.core.records import Capacity, WorkerRecord
from taskmesh.state.keys import COUNTERS, INFLIGHT, NEED_QUEUES, RUNTIMES, STATES, WORKERS


class Registry:
    def __init__(self, client: redis.Redis, alive_s: float = 15.0, memory_s: float = 86400.0) -> None:
        self.client = client
        self.alive_s = alive_s
        self.memory_s = memory_s

    def announce(
        self,
        record: WorkerRecord,
        inflight: Iterable[str] = (),
        state: dict[str, Any] | None = None,
        counters: dict[str, int] | None = None,
        runtimes: dict[str, float] | None = None,
    ) -> None:
        """Say this worker is alive now, which delivery tags it holds, its state and new counts."""
        record = dataclasses.replace(record, last_seen=time.time(), stopped=False)
        pipe = self.client.pipeline(transaction=True)
        pipe.hset(WORKERS, record.key, record.to_json())
        if state is not None:
            pipe.hset(STATES, record.node, json.dumps({**state, "updated": record.last_seen}))
        for name, delta in (counters or {}).items():
            if delta:
                pipe.hincrby(COUNTERS, name, delta)
        for name, amount in (runtimes or {}).items():
            pipe.hincrbyfloat(RUNTIMES, name, amount)
        pipe.delete(INFLIGHT + record.key)
        tags = list(inflight)
        if tags:
            pipe.sadd(INFLIGHT + record.key, *tags)
        pipe.execute()

    def stopped(self, record: WorkerRecord) -> None:
        """A clean stop: Celery restores what the worker held, nothing to reclaim."""
        record = dataclasses.replace(record, last_seen=time.time(), stopped=True)
        pipe = self.client.pipeline(transaction=True)
        pipe.hset(WORKERS, record.key, record.to_json())
        pipe.delete(INFLIGHT + record.key)
        pipe.execute()

    def workers(self, now: float | None = None) -> list[WorkerRecord]:
        """Workers seen within the memory window (forgetting older ones as it goes)."""
        now = time.time() if now is None else now
        records, stale = [], []
        for raw in self.client.hvals(WORKERS):
            record = WorkerRecord.from_json(raw)
            (stale if now - record.last_seen > self.memory_s else records).append(record)
        if stale:
            self.client.hdel(WORKERS, *[r.key for r in stale])
        return records

    def is_alive(self, record: WorkerRecord, now: float | None = None) -> bool:
        now = time.time() if now is None else now
        return not record.stopped and now - record.last_seen <= self.alive_s

    def dead_holding_messages(self, now: float | None = None) -> dict[str, list[str]]:
        """Incarnation key → delivery tags, for workers that died (not stopped) holding messages."""
        dead = [r.key for r in self.workers(now) if not r.stopped and not self.is_alive(r, now)]
        out = {}
        for key in dead:
            tags = [t.decode() for t in self.client.smembers(INFLIGHT + key)]
            if tags:
                out[key] = tags
        return out

    def forget_inflight(self, key: str) -> None:
        self.client.delete(INFLIGHT + key)

    def capacity(self, now: float | None = None) -> Capacity:
        return self.summarise(self.workers(now))

    @staticmethod
    def summarise(records: list[WorkerRecord]) -> Capacity:
        gpus = tuple({g.uuid: g for r in records for g in r.gpus}.values())
        return Capacity(
            workers=len(records),
            gpu_memory_mib=max((g.memory_total_mib for g in gpus), default=None),
            compute_capability=max((g.compute_capability for g in gpus), default=None),
            cpu_threads=max((r.cpu_threads for r in records), default=None),
            memory_total_mib=max((r.memory_total_mib for r in records), default=None),
            gpus=gpus,
        )

    def register_need_queue(self, name: str, vram_mib: int | None, cc: tuple[int, int] | None) -> None:
        self.client.hset(NEED_QUEUES, name, json.dumps({"vram_mib": vram_mib, "cc": list(cc) if cc else None}))

    def need_queues(self) -> dict[str, tuple[int | None, tuple[int, int] | None]]:
        out = {}
        for name, raw in self.client.hgetall(NEED_QUEUES).items():
            data = json.loads(raw)
            out[name.decode()] = (data["vram_mib"], tuple(data["cc"]) if data["cc"] else None)
        return out

    def states(self) -> dict[str, dict[str, Any]]:
        """Node → the last state its admission controller announced."""
        return {node.decode(): json.loads(raw) for node, raw in self.client.hgetall(STATES).items()}

    def held_since(self, now: float | None = None) -> dict[str, float]:
        """Queue → the enqueue time of the oldest message a live worker holds back until it fits."""
        now = time.time() if now is None else now
        oldest: dict[str, float] = {}
        for state in self.states().values():
            if now - float(state.get("updated") or 0) > self.alive_s:
                continue  # a dead worker's messages go back to their queue, where they are counted
            for queue, stamp in (state.get("held_since") or {}).items():
                oldest[queue] = min(float(stamp), oldest.get(queue, float(stamp)))
        return oldest

    def count(self, name: str, delta: int = 1) -> None:
        self.client.hincrby(COUNTERS, name, delta)

    def counters(self) -> dict[str, int]:
        return {k.decode(): int(v) for k, v in self.client.hgetall(COUNTERS).items()}

    def mean_runtimes(self) -> dict[str, float]:
        """Mean observed run time by queue (``q:<queue>``) and by task (``t:<task>``), one read."""
        raw = {k.decode(): float(v) for k, v in self.client.hgetall(RUNTIMES).items()}
        return {
            key[: -len(":sum")]: total / raw[key[: -len(":sum")] + ":count"]
            for key, total in raw.items()
            if key.endswith(":sum") and raw.get(key[: -len(":sum")] + ":count")
        }

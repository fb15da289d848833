"""The worker registry: which workers exist, with what hardware, and which are alive.

Every worker with the admission step announces itself every couple of seconds:
its node name, host, queues and GPUs (UUID, memory, compute capability, health),
and the delivery tags of the messages it holds. Producers read it to refuse a task
no hardware can ever run; the step reads it to find workers that died holding
messages, so those are delivered again now rather than after Redis's visibility
timeout (an hour or more for long GPU tasks).

Liveness is a lease timed by Redis's clock, never a host's: each announce renews it
(``lua/lease.lua`` stamps Redis ``TIME``), so clock skew between hosts changes nothing.
A worker is *alive* while its lease is younger than the reservation TTL, and *presumed
dead* — its messages delivered again — only once it is older than ``dead_after_s``,
well beyond: a worker stalled by a GC pause, a VM freeze or a partition for less than
that keeps its running tasks to itself. Presuming a worker dead (``lua/fence.lua``) is
checked and done in one step; the messages then delivered again are recorded for the
worker, which reads them at its next renewal if it was alive after all.

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

from taskmesh.core.need_queues import need_of
from taskmesh.core.records import Capacity, WorkerRecord
from taskmesh.core.requirements import Requirement
from taskmesh.state.client import lua
from taskmesh.state.keys import COUNTERS, GIVEN_BACK, INFLIGHT, LEASES, NEED_QUEUES, RUNTIMES, STATES, WORKERS


@dataclasses.dataclass(frozen=True)
class Renewal:
    """What a worker learns when it renews its lease."""

    age_s: float | None  # since its previous renewal, by Redis's clock; None: Redis had no lease for it
    given_back: dict[str, str]  # delivery tag → task id, delivered again while it was presumed dead


class Registry:
    def __init__(self, client: redis.Redis, alive_s: float = 15.0, memory_s: float = 86400.0,
                 dead_after_s: float = 60.0) -> None:
        self.client = client
        self.alive_s = alive_s
        self.memory_s = memory_s
        self.dead_after_s = dead_after_s
        self._added: set[str] = set()  # tags ``holding`` added since ``take_added`` was last called
        self._fetched: set[str] = set()  # tags the worker's fetch added to its set, not yet arrived
        self._unarrived: set[str] = set()  # those of them already fetched at the last ``take_added``
        self._renew = client.register_script(lua("lease"))
        self._fence = client.register_script(lua("fence"))

    def announce(
        self,
        record: WorkerRecord,
        inflight: Iterable[str] = (),
        state: dict[str, Any] | None = None,
        counters: dict[str, int] | None = None,
        runtimes: dict[str, float] | None = None,
        gone: Iterable[str] | None = None,
    ) -> Renewal:
        """Renew this worker's lease and say which delivery tags it holds, its state and new
        counts, all in one transaction (a renewal cannot be separated from what it announces).

        With *gone* (the tags announced before and no longer held) only those are removed:
        a tag ``holding`` added after *inflight* was read must survive this announcement,
        or a worker killed before the next one would leave that message to the visibility
        timeout. Without it the set is replaced."""
        record = dataclasses.replace(record, last_seen=time.time(), stopped=False)
        pipe = self.client.pipeline(transaction=True)
        self._renew(keys=[LEASES, GIVEN_BACK + record.key], args=[record.key], client=pipe)
        pipe.hset(WORKERS, record.key, record.to_json())
        if state is not None:
            pipe.hset(STATES, record.node, json.dumps({**state, "updated": record.last_seen}))
        for name, delta in (counters or {}).items():
            if delta:
                pipe.hincrby(COUNTERS, name, delta)
        for name, amount in (runtimes or {}).items():
            pipe.hincrbyfloat(RUNTIMES, name, amount)
        removed = list(gone) if gone is not None else None
        if removed is None:
            pipe.delete(INFLIGHT + record.key)
        elif removed:
            pipe.srem(INFLIGHT + record.key, *removed)
        tags = list(inflight)
        if tags:
            pipe.sadd(INFLIGHT + record.key, *tags)
        age, given_back = pipe.execute()[0]
        flat = [item.decode() for item in given_back]
        return Renewal(float(age) if age else None, dict(zip(flat[::2], flat[1::2], strict=True)))

    def held_set(self, key: str) -> str:
        """The Redis set of the delivery tags worker *key* holds (what its fetch may add to)."""
        return INFLIGHT + key

    def fetched(self, tag: str) -> None:
        """The worker's fetch added *tag* to its set in the script that took the message
        (``worker/fetch.py``): ``holding`` has nothing left to write for it."""
        self._fetched.add(tag)

    def holding(self, key: str, tag: str) -> None:
        """Add one delivery tag to what worker *key* holds, as the message arrives: the next
        announcement can be a second away, and a worker killed meanwhile would leave the message
        to Redis's visibility timeout (an hour or more). Best effort: the announcement follows."""
        self._added.add(tag)
        if tag in self._fetched:
            self._fetched.discard(tag)
            return
        try:
            self.client.sadd(INFLIGHT + key, tag)
        except redis.RedisError:
            pass

    def take_added(self) -> set[str]:
        """The tags ``holding`` added since the last call: taken before the heartbeat reads what
        the worker holds, those it no longer holds are ``gone`` in the next announcement. With
        them, the tags a fetch added a call ago or more that never arrived (refused as they came,
        or given back to their list): a message arrives as it is fetched, so those are not held."""
        added, self._added = self._added, set()
        never = self._unarrived & self._fetched
        self._fetched -= never
        self._unarrived = set(self._fetched)
        return added | never

    def stopped(self, record: WorkerRecord) -> None:
        """A clean stop: Celery restores what the worker held, nothing to reclaim. Its in-flight
        set is kept a while (``dead_after_s``, at least a minute), so what it may still be
        finishing is not taken for orphaned (``state.orphans``)."""
        record = dataclasses.replace(record, last_seen=time.time(), stopped=True)
        pipe = self.client.pipeline(transaction=True)
        pipe.hset(WORKERS, record.key, record.to_json())
        pipe.expire(INFLIGHT + record.key, max(60, int(self.dead_after_s)))
        pipe.execute()

    def workers(self) -> list[WorkerRecord]:
        """Workers seen within the memory window, each with its lease age by Redis's clock
        (forgetting older ones as it goes; one with no lease by the age of its record)."""
        pipe = self.client.pipeline(transaction=False)
        pipe.hvals(WORKERS)
        pipe.zrange(LEASES, 0, -1, withscores=True)
        pipe.time()
        raw, leases, (seconds, micros) = pipe.execute()
        renewed = {key.decode(): score for key, score in leases}
        server_now = seconds + micros / 1e6
        records, stale = [], []
        for record in map(WorkerRecord.from_json, raw):
            age = server_now - renewed[record.key] if record.key in renewed else None
            record = dataclasses.replace(record, lease_age_s=age)
            gone = age > self.memory_s if age is not None else time.time() - record.last_seen > self.memory_s
            (stale if gone else records).append(record)
        if stale:
            pipe = self.client.pipeline(transaction=True)
            pipe.hdel(WORKERS, *[r.key for r in stale])
            pipe.zrem(LEASES, *[r.key for r in stale])
            pipe.execute()
        return records

    def is_alive(self, record: WorkerRecord) -> bool:
        """Its lease, as ``workers`` read it, is younger than the reservation TTL."""
        return not record.stopped and record.lease_age_s is not None and record.lease_age_s <= self.alive_s

    def dead_holding_messages(self) -> dict[str, list[str]]:
        """Incarnation key → delivery tags, for workers (not stopped) holding messages whose
        lease has not been renewed for ``dead_after_s``. A worker with no lease at all is not
        presumed dead: Redis losing its state says nothing about the worker."""
        dead = [r.key for r in self.workers()
                if not r.stopped and r.lease_age_s is not None and r.lease_age_s > self.dead_after_s]
        out = {}
        for key in dead:
            tags = [t.decode() for t in self.client.smembers(INFLIGHT + key)]
            if tags:
                out[key] = tags
        return out

    def fence(self, key: str) -> list[str]:
        """Presume *key* dead if its lease is still older than ``dead_after_s``; returns the
        delivery tags it held, which the caller delivers again (``given_back``)."""
        tags = self._fence(keys=[LEASES, INFLIGHT + key], args=[key, self.dead_after_s])
        return [t.decode() for t in tags]

    def given_back(self, key: str, tag: str, task_id: str) -> None:
        """Record a message of *key* delivered again, for it to find should it come back."""
        pipe = self.client.pipeline(transaction=True)
        pipe.hset(GIVEN_BACK + key, tag, task_id)
        pipe.expire(GIVEN_BACK + key, max(1, int(self.memory_s)))
        pipe.execute()

    def capacity(self) -> Capacity:
        return self.summarise(self.workers())

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
            gpus_per_worker=max((len(r.gpus) for r in records if r.gpus), default=None),
        )

    def register_need_queue(self, name: str, need: Requirement) -> None:
        self.client.hset(NEED_QUEUES, name, json.dumps({
            "vram_mib": need.vram_mib,
            "cc": list(need.min_compute_capability) if need.min_compute_capability else None,
            "gpus": need.gpus,
        }))

    def need_queues(self) -> dict[str, Requirement]:
        """Each registered need queue and what its GPUs must meet (one GPU where no count was stored)."""
        out = {}
        for name, raw in self.client.hgetall(NEED_QUEUES).items():
            data = json.loads(raw)
            cc = tuple(data["cc"]) if data["cc"] else None
            out[name.decode()] = need_of(data["vram_mib"], cc, int(data.get("gpus") or 1))
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

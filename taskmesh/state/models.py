"""Warm models in Redis: what each pool process holds, learned load times, eviction records,
and the one ledger step models need (moving memory between two reservations).

A pool process that loads a model writes its entry in its worker's hash
(``MODELS_HELD`` + node, field = pid); the worker's heartbeat reads it to refresh the
model's reservation with its tasks' and to drop the entries of processes that are gone.
Load times are a moving average per model shared by the fleet (``lua/model_load.lua``).
A worker with a model warm says so in ``MODEL_READY`` + model (node → its slots): producers
read it to send that model's tasks to its model queue (``core.model_queues``); whether the
worker is alive is the registry's lease, not this entry.
"""

from __future__ import annotations

import json
from typing import Any

import redis

from taskmesh.state.client import lua
from taskmesh.state.keys import (
    EVICTIONS,
    LEDGER_PREFIX,
    MODEL_LOAD_S,
    MODEL_LOADS,
    MODEL_READY,
    MODELS_HELD,
    WARM_UPS,
)

EWMA_WEIGHT = 0.3  # of each new measured load
EVICTIONS_KEPT = 100


class ModelStore:
    def __init__(self, client: redis.Redis, ttl_s: float = 15.0, prefix: str = LEDGER_PREFIX) -> None:
        self.client = client
        self.ttl_s = ttl_s
        self.prefix = prefix
        self._move = client.register_script(lua("model_move"))
        self._load = client.register_script(lua("model_load"))

    # --- the ledger ------------------------------------------------------------------

    def move(self, pool: str, source: str, target: str, amount: int, drop: bool = False) -> None:
        """Move *amount* of *pool* from reservation *source* to *target* (``""``: to nobody);
        *drop* deletes *source* whatever it held."""
        keys = [f"{self.prefix}{pool}", f"{self.prefix}{pool}:expiry"]
        self._move(keys=keys, args=[source, target, amount, self.ttl_s, "drop" if drop else ""])

    # --- what each pool process holds --------------------------------------------------

    def hold(self, node: str, pid: int, entry: dict[str, Any]) -> None:
        self.client.hset(f"{MODELS_HELD}{node}", str(pid), json.dumps(entry))

    def held(self, node: str) -> dict[int, dict[str, Any]]:
        """Pool process pid → its entry: ``state``, ``models`` (name → vram_mib, gpu, reservation,
        last_used, tasks, adopted_from), ``since``."""
        raw = self.client.hgetall(f"{MODELS_HELD}{node}")
        return {int(k): json.loads(v) for k, v in raw.items()}

    def forget(self, node: str, pids: list[int]) -> None:
        if pids:
            self.client.hdel(f"{MODELS_HELD}{node}", *[str(p) for p in pids])

    # --- load times ------------------------------------------------------------------

    def record_load(self, name: str, seconds: float, guess: float | None) -> float:
        """Count a measured load; returns the new learned load time."""
        args = [name, seconds, "" if guess is None else guess, EWMA_WEIGHT]
        return float(self._load(keys=[MODEL_LOAD_S, MODEL_LOADS], args=args))

    def learned(self) -> dict[str, float]:
        return {k.decode(): float(v) for k, v in self.client.hgetall(MODEL_LOAD_S).items()}

    def loads(self) -> dict[str, dict[str, float]]:
        """Model → ``count`` and ``seconds`` of loads done by the fleet."""
        out: dict[str, dict[str, float]] = {}
        for key, value in self.client.hgetall(MODEL_LOADS).items():
            name, _, what = key.decode().rpartition(":")
            out.setdefault(name, {})[what] = float(value)
        return out

    # --- which workers have a model ready (affinity) ------------------------------------

    def set_ready(self, node: str, ready: dict[str, int], gone: list[str]) -> None:
        """*node* has the models of *ready* warm (model → its slots) and no longer those of *gone*."""
        pipe = self.client.pipeline(transaction=False)
        for model, slots in ready.items():
            pipe.hset(f"{MODEL_READY}{model}", node, slots)
        for model in gone:
            pipe.hdel(f"{MODEL_READY}{model}", node)
        pipe.execute()

    def ready(self, model: str) -> dict[str, int]:
        """Node → slots, for every worker that last said it has *model* warm (alive or not)."""
        return {k.decode(): int(v) for k, v in self.client.hgetall(f"{MODEL_READY}{model}").items()}

    def record_warm_up(self, decision: dict[str, Any]) -> None:
        self._record(WARM_UPS, decision)

    def warm_ups(self, limit: int = 20) -> list[dict[str, Any]]:
        return self._newest(WARM_UPS, limit)

    # --- eviction decisions ----------------------------------------------------------

    def record_eviction(self, decision: dict[str, Any]) -> None:
        self._record(EVICTIONS, decision)

    def evictions(self, limit: int = 20) -> list[dict[str, Any]]:
        return self._newest(EVICTIONS, limit)

    def _record(self, key: str, decision: dict[str, Any]) -> None:
        """Keep the newest ``EVICTIONS_KEPT`` decisions, newest first."""
        pipe = self.client.pipeline()
        pipe.lpush(key, json.dumps(decision))
        pipe.ltrim(key, 0, EVICTIONS_KEPT - 1)
        pipe.execute()

    def _newest(self, key: str, limit: int) -> list[dict[str, Any]]:
        return [json.loads(raw) for raw in self.client.lrange(key, 0, limit - 1)]

    def summary(self) -> dict[str, Any]:
        """For ``status --json``: learned load times, loads done, the latest eviction and warm-up decisions."""
        return {"learned_load_s": self.learned(), "loads": self.loads(), "evictions": self.evictions(),
                "warm_ups": self.warm_ups()}

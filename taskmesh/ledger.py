"""The reservation ledger: who holds how much of each GPU's memory and each host's
CPU threads and memory, kept in Redis so every worker on every host sees one truth.

Each pool (a GPU by UUID, a host's threads, a host's memory) is a hash of
reservation id → amount plus a sorted set of reservation id → expiry (Redis server
time). A reservation is taken for several pools at once, all or nothing, by one Lua
script, so two workers racing for the last 10 GiB cannot both win. Expired entries
are swept by the same scripts before anything is counted, which is how a worker that
died without releasing loses its reservations: its holder refreshes them every few
seconds while alive, and stops when it is not.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from typing import Protocol, runtime_checkable

import redis

PREFIX = "taskmesh:ledger:"

_SWEEP = """
local function sweep(amounts, expiry, now)
  local dead = redis.call('ZRANGEBYSCORE', expiry, '-inf', now)
  for _, id in ipairs(dead) do redis.call('HDEL', amounts, id) end
  if #dead > 0 then redis.call('ZREMRANGEBYSCORE', expiry, '-inf', now) end
  local used = 0
  for _, v in ipairs(redis.call('HVALS', amounts)) do used = used + tonumber(v) end
  return used
end
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
"""

# KEYS: amounts1, expiry1, amounts2, expiry2, ...  ARGV: id, ttl, cap1, amount1, cap2, amount2, ...
_RESERVE = _SWEEP + """
local id, ttl = ARGV[1], tonumber(ARGV[2])
local n = #KEYS / 2
local used = {}
for i = 1, n do
  used[i] = sweep(KEYS[2*i-1], KEYS[2*i], now)
  local cap, amount = tonumber(ARGV[1 + 2*i]), tonumber(ARGV[2 + 2*i])
  if redis.call('HEXISTS', KEYS[2*i-1], id) == 1 then return {1, i} end
  if used[i] + amount > cap then return {0, i, used[i]} end
end
for i = 1, n do
  redis.call('HSET', KEYS[2*i-1], id, ARGV[2 + 2*i])
  redis.call('ZADD', KEYS[2*i], now + ttl, id)
end
return {1, 0}
"""

# KEYS: amounts1, expiry1, ...  ARGV: ttl, id1, id2, ...  (refresh every listed id in every pool it is in)
_REFRESH = """
local t = redis.call('TIME')
local deadline = tonumber(t[1]) + tonumber(t[2]) / 1000000 + tonumber(ARGV[1])
local refreshed = 0
for i = 1, #KEYS / 2 do
  for j = 2, #ARGV do
    if redis.call('HEXISTS', KEYS[2*i-1], ARGV[j]) == 1 then
      redis.call('ZADD', KEYS[2*i], 'XX', deadline, ARGV[j])
      refreshed = refreshed + 1
    end
  end
end
return refreshed
"""

_USED = _SWEEP + """
local out = {}
for i = 1, #KEYS / 2 do out[i] = sweep(KEYS[2*i-1], KEYS[2*i], now) end
return out
"""


def gpu_pool(uuid: str) -> str:
    return f"gpu:{uuid}"


def host_threads_pool(host: str) -> str:
    return f"host:{host}:threads"


def host_memory_pool(host: str) -> str:
    return f"host:{host}:memory"


@dataclasses.dataclass(frozen=True)
class Claim:
    """An amount of one pool, which holds at most ``capacity``."""

    pool: str
    amount: int
    capacity: int


@dataclasses.dataclass(frozen=True)
class Refusal:
    """Why a reservation was refused: the first pool that had no room."""

    pool: str
    used: int
    amount: int
    capacity: int

    def __str__(self) -> str:
        return f"{self.pool}: {self.used} in use + {self.amount} asked > {self.capacity}"


@runtime_checkable
class LedgerLike(Protocol):
    """What the gate and the admission controller use of a ledger: ``Ledger`` in Redis, or
    ``taskmesh.bench.memory_ledger.MemoryLedger`` for the fleet simulator (same decisions)."""

    def reserve(self, reservation: str, claims: Sequence[Claim]) -> Refusal | None: ...

    def release(self, reservation: str, pools: Iterable[str]) -> None: ...

    def refresh(self, reservations: Sequence[str], pools: Iterable[str]) -> int: ...

    def used(self, pools: Sequence[str]) -> dict[str, int]: ...


class Ledger:
    def __init__(self, client: redis.Redis, ttl_s: float = 15.0, prefix: str = PREFIX) -> None:
        self.client = client
        self.ttl_s = ttl_s
        self.prefix = prefix
        self._reserve = client.register_script(_RESERVE)
        self._refresh = client.register_script(_REFRESH)
        self._used = client.register_script(_USED)

    def _keys(self, pools: Iterable[str]) -> list[str]:
        return [key for pool in pools for key in (f"{self.prefix}{pool}", f"{self.prefix}{pool}:expiry")]

    def reserve(self, reservation: str, claims: Sequence[Claim]) -> Refusal | None:
        """Take every claim or none; ``None`` on success. Reserving an id twice is a no-op."""
        if not claims:
            return None
        args: list[object] = [reservation, self.ttl_s]
        for claim in claims:
            args += [claim.capacity, claim.amount]
        ok, index, *used = self._reserve(keys=self._keys(c.pool for c in claims), args=args)
        if ok:
            return None
        claim = claims[index - 1]
        return Refusal(claim.pool, int(used[0]), claim.amount, claim.capacity)

    def release(self, reservation: str, pools: Iterable[str]) -> None:
        pipe = self.client.pipeline(transaction=True)
        for pool in pools:
            pipe.hdel(f"{self.prefix}{pool}", reservation)
            pipe.zrem(f"{self.prefix}{pool}:expiry", reservation)
        pipe.execute()

    def refresh(self, reservations: Sequence[str], pools: Iterable[str]) -> int:
        """Push back the expiry of *reservations*; returns how many entries were found."""
        pools = list(pools)
        if not reservations or not pools:
            return 0
        return int(self._refresh(keys=self._keys(pools), args=[self.ttl_s, *reservations]))

    def used(self, pools: Sequence[str]) -> dict[str, int]:
        """What is reserved now in each pool (expired entries swept first)."""
        if not pools:
            return {}
        return dict(zip(pools, (int(v) for v in self._used(keys=self._keys(pools))), strict=True))

    def holders(self, pool: str) -> dict[str, int]:
        """Reservation id → amount for one pool, as stored (may include not-yet-swept entries)."""
        raw = self.client.hgetall(f"{self.prefix}{pool}")
        return {k.decode(): int(v) for k, v in raw.items()}

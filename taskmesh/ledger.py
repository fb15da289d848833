"""The reservation ledger: who holds how much of each GPU's memory and each host's
CPU threads and memory, kept in Redis so every worker on every host sees one truth.

Each pool (a GPU by UUID, a host's threads, a host's memory) is a hash of
reservation id → amount plus a sorted set of reservation id → expiry (Redis server
time). A reservation is taken for several pools at once, all or nothing, by one Lua
script, so two workers racing for the last 10 GiB cannot both win; the same script
tries a worker's candidate GPUs in order and takes the first that fits. Expired entries
are swept by the same scripts before anything is counted, which is how a worker that
died without releasing loses its reservations: its holder refreshes them every few
seconds while alive, and stops when it is not.
"""

from __future__ import annotations

import dataclasses
import json
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

# Take the first of several options (each a list of claims) that fits, in one round trip.
# KEYS: amounts1, expiry1, amounts2, expiry2, ... (each pool once)
# ARGV: id, ttl, JSON [[[pool number, capacity, amount], ...claims], ...options] (one argument:
# redis-py packs each argument separately, which for a 64-GPU worker cost more than the script)
# Returns {taken option or 0, then per refused option: option, claim, used}.
_RESERVE_FIRST = _SWEEP + """
local id, ttl = ARGV[1], tonumber(ARGV[2])
local options = cjson.decode(ARGV[3])
for o, option in ipairs(options) do  -- an id already held (unexpired) anywhere: a no-op, whatever the order
  for _, claim in ipairs(option) do
    local expiry = redis.call('ZSCORE', KEYS[2 * claim[1]], id)
    if expiry and tonumber(expiry) > now then return {o} end
  end
end
local used, refusals = {}, {}
for o, option in ipairs(options) do
  local fit = true
  for c, claim in ipairs(option) do
    local k = claim[1]
    if used[k] == nil then used[k] = sweep(KEYS[2*k-1], KEYS[2*k], now) end
    if used[k] + claim[3] > claim[2] then
      table.insert(refusals, o); table.insert(refusals, c); table.insert(refusals, used[k])
      fit = false
      break
    end
  end
  if fit then
    for _, claim in ipairs(option) do
      redis.call('HSET', KEYS[2*claim[1]-1], id, claim[3])
      redis.call('ZADD', KEYS[2*claim[1]], now + ttl, id)
    end
    return {o}
  end
end
local out = {0}
for _, v in ipairs(refusals) do table.insert(out, v) end
return out
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


Taken = tuple[int | None, tuple[Refusal, ...]]  # the option taken (or None), and why the others were refused


@runtime_checkable
class LedgerLike(Protocol):
    """What the gate and the admission controller use of a ledger: ``Ledger`` in Redis, or
    ``taskmesh.bench.memory_ledger.MemoryLedger`` for the fleet simulator (same decisions)."""

    def reserve(self, reservation: str, claims: Sequence[Claim]) -> Refusal | None: ...

    def reserve_first(self, reservation: str, options: Sequence[Sequence[Claim]]) -> Taken: ...

    def release(self, reservation: str, pools: Iterable[str]) -> None: ...

    def refresh(self, reservations: Sequence[str], pools: Iterable[str]) -> int: ...

    def used(self, pools: Sequence[str]) -> dict[str, int]: ...


class Ledger:
    def __init__(self, client: redis.Redis, ttl_s: float = 15.0, prefix: str = PREFIX) -> None:
        self.client = client
        self.ttl_s = ttl_s
        self.prefix = prefix
        self._reserve_first = client.register_script(_RESERVE_FIRST)
        self._refresh = client.register_script(_REFRESH)
        self._used = client.register_script(_USED)

    def _keys(self, pools: Iterable[str]) -> list[str]:
        return [key for pool in pools for key in (f"{self.prefix}{pool}", f"{self.prefix}{pool}:expiry")]

    def reserve(self, reservation: str, claims: Sequence[Claim]) -> Refusal | None:
        """Take every claim or none; ``None`` on success. Reserving an id twice is a no-op."""
        taken, refusals = self.reserve_first(reservation, [claims])
        return None if taken is not None else refusals[0]

    def reserve_first(self, reservation: str, options: Sequence[Sequence[Claim]]) -> Taken:
        """Take the first option whose claims all fit, all or nothing, in one round trip (a
        worker with eight GPUs tries them in best-fit order without eight calls)."""
        if not options or not options[0]:
            return (0 if options else None), ()
        pools: dict[str, int] = {}
        packed = [[[pools.setdefault(c.pool, len(pools) + 1), c.capacity, c.amount] for c in option]
                  for option in options]
        args = [reservation, self.ttl_s, json.dumps(packed)]
        taken, *refused = self._reserve_first(keys=self._keys(pools), args=args)
        refusals = tuple(
            Refusal(claim.pool, int(used), claim.amount, claim.capacity)
            for option, index, used in zip(refused[::3], refused[1::3], refused[2::3], strict=True)
            for claim in [options[option - 1][index - 1]]
        )
        return (taken - 1 if taken else None), refusals

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

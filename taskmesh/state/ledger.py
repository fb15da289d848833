"""The reservation ledger: who holds how much of each GPU's memory and each host's
CPU threads and memory, kept in Redis so every worker on every host sees one truth.

Each pool (a GPU by UUID, a host's threads, a host's memory) is a hash of
reservation id → amount plus a sorted set of reservation id → expiry (Redis server
time). A reservation is taken for several pools at once, all or nothing, by one Lua
script, so two workers racing for the last 10 GiB cannot both win; the same script
tries a worker's candidate GPUs in order and takes the first that fits. Expired entries
are swept by the same scripts before anything is counted, which is how a worker that
died without releasing loses its reservations: its holder refreshes them every few
seconds while alive, and stops when it is not. A refresh also writes back what the
ledger lost while the holder still runs (a stall past the TTL, a Redis restart, deleted
keys), so the memory of running tasks is never forgotten for longer than a heartbeat.
The scripts are in ``lua/``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence

import redis

from taskmesh.core.claims import Claim, Refusal, Taken
from taskmesh.state.client import lua
from taskmesh.state.keys import LEDGER_PREFIX


def _script(name: str) -> str:
    """A script from ``lua/``; all but ``refresh`` sweep expired entries first."""
    return lua(name) if name == "refresh" else lua("sweep") + lua(name)


class Ledger:
    def __init__(self, client: redis.Redis, ttl_s: float = 15.0, prefix: str = LEDGER_PREFIX) -> None:
        self.client = client
        self.ttl_s = ttl_s
        self.prefix = prefix
        self._reserve_first = client.register_script(_script("reserve_first"))
        self._refresh = client.register_script(_script("refresh"))
        self._used = client.register_script(_script("used"))

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

    def refresh(self, held: Mapping[str, Mapping[str, int]]) -> list[str]:
        """Push back the expiry of what a worker holds (reservation id → pool → amount) and
        write back what the ledger lost, even past a pool's capacity: the memory is in use, and
        an over-full pool refuses new work until it drains. Returns the ids written back."""
        pools: dict[str, int] = {}
        packed = [[reservation, [[pools.setdefault(pool, len(pools) + 1), amount] for pool, amount in claims.items()]]
                  for reservation, claims in held.items() if claims]
        if not packed:
            return []
        recreated = self._refresh(keys=self._keys(pools), args=[self.ttl_s, json.dumps(packed)])
        return [r.decode() if isinstance(r, bytes) else r for r in recreated]

    def used(self, pools: Sequence[str]) -> dict[str, int]:
        """What is reserved now in each pool (expired entries swept first)."""
        if not pools:
            return {}
        return dict(zip(pools, (int(v) for v in self._used(keys=self._keys(pools))), strict=True))

    def holders(self, pool: str) -> dict[str, int]:
        """Reservation id → amount for one pool, as stored (may include not-yet-swept entries)."""
        raw = self.client.hgetall(f"{self.prefix}{pool}")
        return {k.decode(): int(v) for k, v in raw.items()}

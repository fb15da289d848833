"""The reservation ledger's exact semantics in one process's memory, for the fleet
simulator: a million decisions through Redis take longer than the simulation itself.

Same interface as ``taskmesh.state.ledger.Ledger`` (``LedgerLike``) and the same rules as its
Lua scripts — all-or-nothing over several pools, a reservation id taken twice is a
no-op, expired entries swept before anything is counted — with an injectable clock
so simulated time can drive expiry. ``tests/test_bench_sim.py`` runs the same random
operations against both and checks every answer is the same.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping, Sequence

from taskmesh.core.claims import Claim, Refusal, Taken


class MemoryLedger:
    def __init__(self, ttl_s: float = 15.0, clock: Callable[[], float] = time.time) -> None:
        self.ttl_s = ttl_s
        self.clock = clock
        self.pools: dict[str, dict[str, tuple[int, float]]] = {}  # pool → reservation → (amount, expiry)

    def _sweep(self, pool: str, now: float) -> int:
        holders = self.pools.get(pool)
        if not holders:
            return 0
        for dead in [r for r, (_, expiry) in holders.items() if expiry <= now]:
            del holders[dead]
        return sum(amount for amount, _ in holders.values())

    def reserve(self, reservation: str, claims: Sequence[Claim]) -> Refusal | None:
        """Take every claim or none; ``None`` on success. Reserving an id twice is a no-op."""
        taken, refusals = self.reserve_first(reservation, [claims])
        return None if taken is not None else refusals[0]

    def reserve_first(self, reservation: str, options: Sequence[Sequence[Claim]]) -> Taken:
        now = self.clock()
        for index, option in enumerate(options):  # an id already held (unexpired) anywhere: a no-op
            if any(self.pools.get(claim.pool, {}).get(reservation, (0, now))[1] > now for claim in option):
                return index, ()
        used: dict[str, int] = {}
        refusals = []
        for index, option in enumerate(options):
            for claim in option:
                if claim.pool not in used:
                    used[claim.pool] = self._sweep(claim.pool, now)
                if used[claim.pool] + claim.amount > claim.capacity:
                    refusals.append(Refusal(claim.pool, used[claim.pool], claim.amount, claim.capacity))
                    break
            else:
                for claim in option:
                    self.pools.setdefault(claim.pool, {})[reservation] = (claim.amount, now + self.ttl_s)
                return index, ()
        return None, tuple(refusals)

    def release(self, reservation: str, pools: Iterable[str]) -> None:
        for pool in pools:
            self.pools.get(pool, {}).pop(reservation, None)

    def refresh(self, held: Mapping[str, Mapping[str, int]]) -> list[str]:
        now = self.clock()
        recreated = []
        for reservation, claims in held.items():
            missing = False
            for pool, amount in claims.items():
                holders = self.pools.setdefault(pool, {})
                kept = holders.get(reservation)
                if kept is None or kept[1] <= now:  # lost or expired: written back, room or not
                    kept, missing = (amount, now), True
                holders[reservation] = (kept[0], now + self.ttl_s)
            if missing:
                recreated.append(reservation)
        return recreated

    def used(self, pools: Sequence[str]) -> dict[str, int]:
        now = self.clock()
        return {pool: self._sweep(pool, now) for pool in pools}

    def holders(self, pool: str) -> dict[str, int]:
        return {reservation: amount for reservation, (amount, _) in self.pools.get(pool, {}).items()}

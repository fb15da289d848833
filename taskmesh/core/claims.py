"""What a reservation is made of: claims on pools, refusals, and the ledger interface.

A pool is one GPU (by UUID), one host's CPU threads or one host's memory; a claim
asks an amount of one pool that holds at most ``capacity``. The ``LedgerLike``
protocol is what the gate and the worker use of a ledger, so the same decision runs
against Redis (``state.ledger.Ledger``) and in memory (``state.memory_ledger``, for
the fleet simulator and tests).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from typing import Protocol, runtime_checkable


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
    ``taskmesh.state.memory_ledger.MemoryLedger`` for the fleet simulator (same decisions)."""

    def reserve(self, reservation: str, claims: Sequence[Claim]) -> Refusal | None: ...

    def reserve_first(self, reservation: str, options: Sequence[Sequence[Claim]]) -> Taken: ...

    def release(self, reservation: str, pools: Iterable[str]) -> None: ...

    def refresh(self, held: Mapping[str, Mapping[str, int]]) -> list[str]: ...

    def used(self, pools: Sequence[str]) -> dict[str, int]: ...

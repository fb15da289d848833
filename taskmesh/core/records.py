"""What a worker announces of itself (``WorkerRecord``, with its ``GpuRecord``s), and the
``Capacity`` a producer derives from all of them.

Plain frozen records with a JSON form: the registry in ``taskmesh.state`` stores
them, and producers, the rebalancer and the exporter read them.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any


@dataclasses.dataclass(frozen=True)
class GpuRecord:
    uuid: str
    index: int
    name: str
    memory_total_mib: int
    compute_capability: tuple[int, int]
    healthy: bool = True


@dataclasses.dataclass(frozen=True)
class WorkerRecord:
    node: str
    incarnation: str  # one per worker start: a restarted worker is a new incarnation
    host: str
    queues: tuple[str, ...]
    gpus: tuple[GpuRecord, ...]
    cpu_threads: int
    memory_total_mib: int
    last_seen: float = 0.0  # the worker's own clock: for display only, never for liveness
    stopped: bool = False
    lease_age_s: float | None = None  # since it last renewed its lease, by Redis's clock (None: no lease)

    @property
    def key(self) -> str:
        return f"{self.node}#{self.incarnation}"

    def to_json(self) -> str:
        """The stored form; the lease age is read from Redis, never stored."""
        return json.dumps({k: v for k, v in dataclasses.asdict(self).items() if k != "lease_age_s"})

    @classmethod
    def from_json(cls, raw: str | bytes) -> WorkerRecord:
        data: dict[str, Any] = json.loads(raw)
        gpus = tuple(
            GpuRecord(**{**g, "compute_capability": tuple(g["compute_capability"])}) for g in data.pop("gpus")
        )
        return cls(**{**data, "queues": tuple(data.pop("queues")), "gpus": gpus})


@dataclasses.dataclass(frozen=True)
class Capacity:
    """The largest of each kind that the registry has seen recently."""

    workers: int
    gpu_memory_mib: int | None
    compute_capability: tuple[int, int] | None
    cpu_threads: int | None
    memory_total_mib: int | None
    gpus: tuple[GpuRecord, ...]

"""What a worker announces of itself (``WorkerRecord``, with its ``GpuRecord``s), and the
``Capacity`` a producer derives from all of them.

Plain frozen records with a JSON form: the registry in ``taskmesh.state`` stores
them, and producers, the rebalancer and the exporter read them. Reading keeps only the
fields this version knows and lets the ones with defaults be absent, so a rolling upgrade
(a newer worker announcing a field an older producer does not know, or the other way
round) breaks no reader.
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
    state: str = "idle"  # idle, loading, ready, busy, unloading (core.models)
    models: tuple[str, ...] = ()  # the models warm on it


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
            GpuRecord(**{**_known(GpuRecord, g), "compute_capability": tuple(g["compute_capability"]),
                         "models": tuple(g.get("models") or ())})
            for g in data.get("gpus") or ()
        )
        return cls(**{**_known(cls, data), "queues": tuple(data.get("queues") or ()), "gpus": gpus})


def _known(record: type, data: dict[str, Any]) -> dict[str, Any]:
    """The fields of *record* that *data* has; a field only a newer version writes is left out."""
    names = {f.name for f in dataclasses.fields(record)}
    return {k: v for k, v in data.items() if k in names}


@dataclasses.dataclass(frozen=True)
class Capacity:
    """The largest of each kind that the registry has seen recently."""

    workers: int
    gpu_memory_mib: int | None
    compute_capability: tuple[int, int] | None
    cpu_threads: int | None
    memory_total_mib: int | None
    gpus: tuple[GpuRecord, ...]
    gpus_per_worker: int | None = None  # the most GPUs one worker sees: a task's gpus=N needs N in one

"""The simulator's stand-ins for one GPU worker and its host, and what a run measured.

A ``Worker`` is the state ``Simulation`` keeps per simulated ``celery worker``: the real
``Gate`` it decides with, and the re-modelled rest (pool slots, consumed queues, held line,
BRPOP bookkeeping, learned run times). ``HostMemory`` stands in for the Redis hash the real
``SimulatedProvider`` reads, so the provider's own code sees the running tasks' memory.
"""

from __future__ import annotations

import array
import collections
import dataclasses
from typing import Any

from taskmesh.core.forecast import RunTimes
from taskmesh.core.gate import Gate
from taskmesh.core.records import WorkerRecord

HOST_MEMORY_MIB = 1024 * 1024  # simulated hosts' RAM: GPU tasks here declare none, so it never binds


class HostMemory:
    """What a simulated host's GPUs show as used: stands in for the Redis hash that
    ``SimulatedProvider`` reads, so the provider's own code sees running tasks' memory."""

    def __init__(self) -> None:
        self.used: dict[int, int] = collections.defaultdict(int)

    def hgetall(self, _key: str) -> dict[bytes, bytes]:  # one object per host: the key names that host
        return {f"used:{i}".encode(): str(mib).encode() for i, mib in self.used.items() if mib}


class Worker:
    """One simulated ``celery worker`` for one GPU: its gate, pool slots, queues and held line."""

    __slots__ = ("node", "record", "gate", "gpu", "memory", "slots", "queues", "line", "held_since",
                 "token", "blocked", "runs", "learned")

    def __init__(self, record: WorkerRecord, gate: Gate, gpu: Any, memory: HostMemory, slots: int) -> None:
        self.node, self.record, self.gate, self.gpu, self.memory, self.slots = (record.node, record, gate, gpu,
                                                                                memory, slots)
        self.queues: list[str] = ["gpu"]
        self.line: collections.deque[int] = collections.deque()  # held jobs, in arrival order
        self.held_since = -1.0  # since when the line has not been empty
        self.token = 0
        self.blocked = False
        self.runs: dict[int, tuple[float, int, int]] = {}  # running job → (start, class, MiB)
        self.learned = RunTimes()  # per class, as the controller learns them per task name


@dataclasses.dataclass
class Outcome:
    makespan_s: float = 0.0
    rejected: int = 0
    admitted: int = 0
    waits: int = 0
    reroutes: int = 0
    reserved_area: float = 0.0  # MiB x seconds reserved by admitted tasks
    busy_slot_s: float = 0.0
    held_s: float = 0.0  # time workers spent holding a message that did not fit yet
    longest_head_wait_s: float = 0.0  # the longest a message waited at the head of a held line
    produce_us: array.array = dataclasses.field(default_factory=lambda: array.array("f"))
    decide_us: array.array = dataclasses.field(default_factory=lambda: array.array("f"))
    release_us: array.array = dataclasses.field(default_factory=lambda: array.array("f"))
    schedule: list[tuple[int, str, float, float, int]] = dataclasses.field(default_factory=list)

"""The simulated GPU provider: GPUs that exist only on paper, built from a spec such as
``2x24GiB`` or ``1x80GiB,cc=9.0;1x24GiB,cc=8.9``.

It is a product feature — the demo, capacity planning and every test without a GPU
run on it — so it lives here beside NVML, not under tests. ``SimulationControl``
changes a simulation at run time from any process through Redis.
"""

from __future__ import annotations

import dataclasses
import socket
import uuid
from typing import Any

from taskmesh.core.gpus import GpuInfo, parse_simulated_spec
from taskmesh.state.keys import simulation_key


class SimulatedProvider:
    """GPUs that exist only on paper, with stable UUIDs derived from host and position.

    Deterministic UUIDs let the supervisor, each worker and the tests agree on which
    GPU is which without sharing state. With a Redis *control* client, drills can
    change the simulation at run time from any process (``SimulationControl``):
    memory used by "other processes", a failed GPU, GPUs added to the machine.
    """

    def __init__(self, spec: str, host: str | None = None, control: Any = None) -> None:
        self.spec = spec
        self.host = host or socket.gethostname()
        self.control = control
        self._gpus = self._build(spec, start=0)
        self._last: tuple[Any, tuple[GpuInfo, ...]] = (None, ())  # the last control hash read, and its answer

    def _build(self, spec: str, start: int) -> tuple[GpuInfo, ...]:
        gpus = []
        for group in parse_simulated_spec(spec):
            for _ in range(group.count):
                index = start + len(gpus)
                gpu_uuid = "GPU-" + str(uuid.uuid5(uuid.NAMESPACE_DNS, f"{self.host}/sim/{index}"))
                gpus.append(
                    GpuInfo(
                        index=index,
                        uuid=gpu_uuid,
                        name=group.name,
                        memory_total_mib=group.memory_mib,
                        memory_used_mib=0,
                        compute_capability=group.compute_capability,
                        simulated=True,
                    )
                )
        return tuple(gpus)

    def snapshot(self) -> tuple[GpuInfo, ...]:
        if self.control is None:
            return self._gpus
        raw = self.control.hgetall(simulation_key(self.host))
        if raw == self._last[0]:  # unchanged since the last reading (the common case): the same answer
            return self._last[1]
        state = {k.decode(): v.decode() for k, v in raw.items()}
        gpus = self._gpus
        if state.get("extra"):
            gpus = gpus + self._build(state["extra"], start=len(gpus))
        snapshot = tuple(
            dataclasses.replace(
                g,
                memory_used_mib=min(g.memory_total_mib, int(state.get(f"used:{g.index}", 0))),
                healthy=state.get(f"failed:{g.index}") != "1",
            )
            for g in gpus
        )
        self._last = (raw, snapshot)
        return snapshot


class SimulationControl:
    """Drive a ``SimulatedProvider`` from outside: for tests, drills and capacity planning."""

    def __init__(self, client: Any, host: str | None = None) -> None:
        self.client = client
        self.key = simulation_key(host or socket.gethostname())

    def fail(self, index: int) -> None:
        self.client.hset(self.key, f"failed:{index}", "1")

    def recover(self, index: int) -> None:
        self.client.hdel(self.key, f"failed:{index}")

    def use(self, index: int, mib: int) -> None:
        """Pretend another process uses *mib* of GPU *index* (0 frees it)."""
        self.client.hset(self.key, f"used:{index}", mib)

    def add(self, spec: str) -> None:
        parse_simulated_spec(spec, source="simulated GPUs to add")
        current = self.client.hget(self.key, "extra")
        self.client.hset(self.key, "extra", f"{current.decode()};{spec}" if current else spec)

    def reset(self) -> None:
        self.client.delete(self.key)

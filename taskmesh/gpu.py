"""GPU providers: where taskmesh learns which GPUs exist and how much memory is free.

One small interface, two implementations, in the manner of httpx's transports:
``NvmlProvider`` asks the driver (nvidia-ml-py), ``SimulatedProvider`` is built from
a spec such as ``2x24GiB`` or ``1x80GiB,cc=9.0;1x24GiB,cc=8.9``. The simulated one is
a product feature — the demo, capacity planning and every test without a GPU run on
it — so it lives here, not under tests.

GPUs are keyed by UUID everywhere: NVML ignores ``CUDA_VISIBLE_DEVICES`` and indices
change between processes, a UUID does not. The parent worker process only ever
talks to NVML, never to CUDA, so forking pool children stays safe.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import socket
import uuid
from typing import Any, Protocol, runtime_checkable

from .errors import ConfigError
from .sizes import SizeError, format_mib, parse_mib

log = logging.getLogger(__name__)
SIMULATE_ENV = "TASKMESH_SIMULATE_GPUS"


@dataclasses.dataclass(frozen=True)
class GpuInfo:
    """One GPU as observed now. Memory in MiB."""

    index: int
    uuid: str
    name: str
    memory_total_mib: int
    memory_used_mib: int
    compute_capability: tuple[int, int]
    healthy: bool = True
    simulated: bool = False
    utilization_percent: float | None = None  # telemetry, where the provider has it
    temperature_c: float | None = None
    power_w: float | None = None

    @property
    def memory_free_mib(self) -> int:
        return max(0, self.memory_total_mib - self.memory_used_mib)

    def describe(self) -> str:
        cc = ".".join(map(str, self.compute_capability))
        return f"GPU {self.index} {self.name} {format_mib(self.memory_total_mib)} cc={cc} {self.uuid}"


@runtime_checkable
class GpuProvider(Protocol):
    """Anything that can list this machine's GPUs with their current memory use."""

    def snapshot(self) -> tuple[GpuInfo, ...]: ...


@dataclasses.dataclass(frozen=True)
class SimulatedGpuSpec:
    count: int
    memory_mib: int
    compute_capability: tuple[int, int] = (8, 9)
    name: str = "Simulated GPU"


_GROUP = re.compile(r"^\s*(\d+)\s*x\s*([^,]+?)\s*((?:,\s*\w+\s*=\s*[^,]+)*)\s*$")
SPEC_HELP = "write it like '2x24GiB' or '1x80GiB,cc=9.0;1x24GiB,cc=8.9'"


def parse_simulated_spec(spec: str, source: str = SIMULATE_ENV) -> tuple[SimulatedGpuSpec, ...]:
    """Parse ``NxSIZE[,cc=X.Y][,name=...]`` groups separated by ``;``."""
    groups = []
    for part in spec.split(";"):
        match = _GROUP.match(part)
        if not part.strip() or match is None:
            raise ConfigError(source, None, f"{spec!r} is not a GPU spec", SPEC_HELP)
        count = int(match[1])
        if count < 1:
            raise ConfigError(source, None, f"{part.strip()!r} asks for {count} GPUs", SPEC_HELP)
        try:
            memory = parse_mib(match[2])
        except SizeError as exc:
            raise ConfigError(source, None, f"{part.strip()!r}: {exc}", SPEC_HELP) from None
        extras = dict(
            (k.strip().lower(), v.strip())
            for k, v in (kv.split("=", 1) for kv in match[3].split(",") if kv.strip())
        )
        cc = (8, 9)
        if "cc" in extras:
            cc_match = re.match(r"^(\d+)\.(\d+)$", extras.pop("cc"))
            if cc_match is None:
                raise ConfigError(source, None, f"{part.strip()!r}: cc must look like 8.9", SPEC_HELP)
            cc = (int(cc_match[1]), int(cc_match[2]))
        name = extras.pop("name", "Simulated GPU")
        if extras:
            raise ConfigError(
                source, None, f"{part.strip()!r}: unknown field(s) {sorted(extras)}", "only cc= and name= are known"
            )
        groups.append(SimulatedGpuSpec(count, memory, cc, name))
    return tuple(groups)


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
        state = {k.decode(): v.decode() for k, v in self.control.hgetall(simulation_key(self.host)).items()}
        gpus = self._gpus
        if state.get("extra"):
            gpus = gpus + self._build(state["extra"], start=len(gpus))
        return tuple(
            dataclasses.replace(
                g,
                memory_used_mib=min(g.memory_total_mib, int(state.get(f"used:{g.index}", 0))),
                healthy=state.get(f"failed:{g.index}") != "1",
            )
            for g in gpus
        )


def simulation_key(host: str) -> str:
    return f"taskmesh:simulated:{host}"


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


class NvmlProvider:
    """Real GPUs through NVML. With no driver or library it reports none and logs why."""

    def __init__(self) -> None:
        self.unavailable_reason: str | None = None
        try:
            import pynvml

            pynvml.nvmlInit()
        except Exception as exc:  # ImportError, NVMLError_LibraryNotFound, driver errors
            self.unavailable_reason = f"NVML unavailable ({type(exc).__name__}: {exc})"
            log.info("no GPUs: %s", self.unavailable_reason)
            self._nvml = None
            return
        self._nvml = pynvml
        self._xid_failed: set[str] = set()
        self._events = _optional(pynvml.nvmlEventSetCreate)
        for index in range(pynvml.nvmlDeviceGetCount()):
            if self._events is not None:
                handle = pynvml.nvmlDeviceGetHandleByIndex(index)
                _optional(pynvml.nvmlDeviceRegisterEvents, handle, pynvml.nvmlEventTypeXidCriticalError, self._events)

    def snapshot(self) -> tuple[GpuInfo, ...]:
        nvml = self._nvml
        if nvml is None:
            return ()
        self._poll_xid()
        gpus = []
        for index in range(nvml.nvmlDeviceGetCount()):
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
            name = nvml.nvmlDeviceGetName(handle)
            gpu_uuid = nvml.nvmlDeviceGetUUID(handle)
            try:
                memory = nvml.nvmlDeviceGetMemoryInfo(handle)
                cc = nvml.nvmlDeviceGetCudaComputeCapability(handle)
            except nvml.NVMLError as exc:
                log.warning("GPU %s (%s) does not answer NVML: %s", index, gpu_uuid, exc)
                gpus.append(GpuInfo(index, _text(gpu_uuid), _text(name), 0, 0, (0, 0), healthy=False))
                continue
            gpus.append(
                GpuInfo(
                    index=index,
                    uuid=_text(gpu_uuid),
                    name=_text(name),
                    memory_total_mib=memory.total // 2**20,
                    memory_used_mib=memory.used // 2**20,
                    compute_capability=(int(cc[0]), int(cc[1])),
                    healthy=_text(gpu_uuid) not in self._xid_failed,
                    utilization_percent=getattr(_optional(nvml.nvmlDeviceGetUtilizationRates, handle), "gpu", None),
                    temperature_c=_optional(nvml.nvmlDeviceGetTemperature, handle, 0),
                    power_w=(_optional(nvml.nvmlDeviceGetPowerUsage, handle) or 0) / 1000 or None,
                )
            )
        return tuple(gpus)

    def _poll_xid(self) -> None:
        """Drain critical Xid events (non-blocking); a GPU that reported one stays unhealthy."""
        nvml = self._nvml
        while self._events is not None:
            try:
                event = nvml.nvmlEventSetWait_v2(self._events, 0)
            except nvml.NVMLError:
                return
            gpu_uuid = _text(nvml.nvmlDeviceGetUUID(event.device))
            log.error("GPU %s reported critical Xid %s; it takes no more work", gpu_uuid, event.eventData)
            self._xid_failed.add(gpu_uuid)


def _optional(read: Any, *args: Any) -> Any:
    """An NVML reading that some GPUs do not support (power on some boards, events in containers)."""
    try:
        return read(*args)
    except Exception:
        return None


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


def provider_from_env(simulate: str | None = None, control: Any = None) -> GpuProvider:
    """``TASKMESH_SIMULATE_GPUS`` (or *simulate*, e.g. from config) wins; else NVML.

    *control* (a Redis client) lets simulated GPUs be changed at run time.
    """
    spec = os.environ.get(SIMULATE_ENV) or simulate
    if spec:
        return SimulatedProvider(spec, control=control)
    return NvmlProvider()

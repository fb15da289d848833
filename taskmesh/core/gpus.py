"""What a GPU is, to taskmesh: an observed reading (``GpuInfo``), the one interface that
produces readings (``GpuProvider``), and the spec language of simulated GPUs.

These are value objects and a protocol, with no driver in them, so the admission
decision in ``core.gate`` can take them as inputs; the implementations (NVML, the
simulated provider) live in ``taskmesh.hardware``, in the manner of httpx's
transports. GPUs are keyed by UUID everywhere: NVML ignores ``CUDA_VISIBLE_DEVICES``
and indices change between processes, a UUID does not.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Protocol, runtime_checkable

from taskmesh.core.errors import ConfigError
from taskmesh.core.sizes import SizeError, format_mib, parse_mib

SIMULATE_ENV = "TASKMESH_SIMULATE_GPUS"

# Xids that a faulty *program* causes, not a faulty GPU: NVIDIA's own Kubernetes device
# plugin keeps a GPU healthy on these (a bad kernel's page fault must not take a GPU out of
# service for every other team); the failing task sees its own CUDA error.
APPLICATION_XIDS = frozenset({
    13,  # graphics engine exception
    31,  # GPU memory page fault
    43,  # GPU stopped processing
    45,  # preemptive cleanup, due to previous errors
    68,  # video processor exception
})


def xid_takes_gpu_out(xid: int) -> bool:
    """Whether a critical Xid means the GPU itself failed (until a reset) or only a program did."""
    return xid not in APPLICATION_XIDS


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

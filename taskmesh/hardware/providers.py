"""Which ``GpuProvider`` a process uses: a simulation when one is asked for, else NVML."""

from __future__ import annotations

import os
from typing import Any

from taskmesh.core.gpus import SIMULATE_ENV, GpuProvider
from taskmesh.hardware.nvml import NvmlProvider
from taskmesh.hardware.simulated import SimulatedProvider


def provider_from_env(simulate: str | None = None, control: Any = None) -> GpuProvider:
    """``TASKMESH_SIMULATE_GPUS`` (or *simulate*, e.g. from config) wins; else NVML.

    *control* (a Redis client) lets simulated GPUs be changed at run time.
    """
    spec = os.environ.get(SIMULATE_ENV) or simulate
    if spec:
        return SimulatedProvider(spec, control=control)
    return NvmlProvider()

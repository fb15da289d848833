"""Host pressure: whether this host is too loaded to take more CPU work (psutil)."""

from __future__ import annotations

import os

import psutil

from taskmesh.core.config import AdmissionConfig


def host_pressure(config: AdmissionConfig, cpu_threads: int) -> str | None:
    """A reason to stop taking CPU work on this host, or ``None``."""
    memory = psutil.virtual_memory().percent
    if memory > config.max_memory_percent:
        return f"host memory {memory:.0f}% > {config.max_memory_percent:.0f}%"
    load = os.getloadavg()[0] / max(1, cpu_threads)
    if load > config.max_load_per_thread:
        return f"load {load:.1f} per CPU thread > {config.max_load_per_thread:.1f}"
    return None

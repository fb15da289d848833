"""Scenario 6: real GPUs — not built yet, and always reported as skipped with the reason.

What it will measure, on a machine with NVIDIA GPUs, PyTorch and nvidia-ml-py: tasks
that allocate real device memory (``torch.empty`` of their declared ``vram``) under
admission against the same tasks unguarded (plain Celery, one prefork slot per GPU
share), counting CUDA out-of-memory failures, peak NVML memory and total time.
"""

from __future__ import annotations

from typing import Any

from ..gpu import NvmlProvider
from .scenario import Context, Result

TITLE = "Real GPU: torch tasks allocating real memory, under admission and unguarded"
FULL: dict[str, Any] = {}
SMOKE: dict[str, Any] = {}


def run(params: dict[str, Any], ctx: Context) -> Result:
    gpus = NvmlProvider().snapshot()
    found = f"{len(gpus)} NVIDIA GPU(s) found" if gpus else "no NVIDIA GPU found"
    return Result("real_gpu", TITLE, status="skipped", params=params,
                  reason=f"not implemented yet ({found}); the figures for real GPUs are still to be measured: "
                         "see BENCHMARKS.md, scenario 6")

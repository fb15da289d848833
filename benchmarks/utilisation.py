"""Scenario 5: how busy the simulated GPUs and the CPUs were during scenario 1's runs.

GPU busy fraction: time GPU tasks held their slot (from each task's own start and end,
on the GPU admission placed it on) over GPU slots x the time until the last GPU task
ended. CPU utilisation: psutil's system-wide figure, sampled while CPU tasks were still
waiting to start, and over the whole run; "useful" is the CPU seconds the CPU tasks
themselves burned over cores x the time until the last CPU task ended.
"""

from __future__ import annotations

from typing import Any

from benchmarks import mixed
from benchmarks.scenario import Context, Result

TITLE = "Utilisation during the mixed workload: GPU busy fraction and CPU utilisation"
FULL: dict[str, Any] = {}
SMOKE: dict[str, Any] = {}


def run(params: dict[str, Any], ctx: Context) -> Result:
    source = ctx.results.get("mixed")
    if source is None or source.status != "ok":
        source = mixed.run(dict(mixed.SMOKE if ctx.smoke else mixed.FULL), ctx)
        ctx.results["mixed"] = source
    result = Result("utilisation", TITLE, params={"from": "mixed", **source.params})
    for system, run_ in source.metrics["runs"].items():
        use = run_["utilisation"]
        result.rows.append({"system": system, "gpu_busy": use["gpu_busy"],
                            "cpu_util_while_cpu_waiting": use["cpu_util_while_cpu_waiting"],
                            "cpu_util_whole_run": use["cpu_util_whole_run"], "cpu_useful": use["cpu_useful"],
                            "gpus_used": len(use["gpus_used"])})
    taskmesh = source.metrics["runs"].get("taskmesh", {}).get("utilisation", {})
    result.metrics.update(gpu_busy=taskmesh.get("gpu_busy"),
                          cpu_util_while_cpu_waiting=taskmesh.get("cpu_util_while_cpu_waiting"))
    result.target("gpu_busy", "> 0.9")
    result.target("cpu_util_while_cpu_waiting", "> 0.8")
    result.notes.append("CPU utilisation is system-wide: other load on the machine counts as busy")
    return result

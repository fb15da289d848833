"""What each GPU of a worker is doing: running tasks, tasks done, idle since.

Kept apart from admission: the controller tells it when a task starts and ends on a
GPU; ``taskmesh status``, ``top``, the exporter and Flower read the result through
the worker's announced state. Methods are called under the controller's lock.
"""

from __future__ import annotations

import time
from typing import Any

from taskmesh.core.sizes import format_mib


class GpuActivity:
    def __init__(self) -> None:
        self._gpus: dict[str, dict[str, Any]] = {}  # uuid → {"running": {id: info}, "done", "idle_since"}
        self._since = time.time()  # a GPU that never ran a task has been idle since the worker started

    def _gpu(self, uuid: str) -> dict[str, Any]:
        return self._gpus.setdefault(uuid, {"running": {}, "done": 0, "idle_since": time.time()})

    def started(self, uuids: tuple[str, ...], task_id: str, task: str | None) -> None:
        for uuid in uuids:
            self._gpu(uuid)["running"][task_id] = {"task": task, "started": time.time()}

    def ended(self, uuids: tuple[str, ...], task_id: str) -> None:
        for uuid in uuids:
            gpu = self._gpu(uuid)
            gpu["running"].pop(task_id, None)
            gpu["done"] += 1
            if not gpu["running"]:
                gpu["idle_since"] = time.time()

    def of(self, uuid: str) -> dict[str, Any]:
        """A copy, for the state a worker announces."""
        gpu = self._gpus.get(uuid, {"running": {}, "done": 0, "idle_since": self._since})
        return {
            "running": [{"id": task_id, **info} for task_id, info in gpu["running"].items()],
            "tasks_done": gpu["done"],
            "idle_since": gpu["idle_since"],
        }


def gpu_summary(state: dict[str, Any]) -> str:
    """One plain line per GPU of *state*, for Flower's worker page.

    Flower lists extra ``stats`` entries as their ``str()``, so the detailed
    ``taskmesh`` dict shows there as one long Python repr; this line is what an
    operator reads at a glance: model, reserved of total, observed free, health, and the
    warm models' state when it holds any.
    """
    return "; ".join(
        f"GPU {g['index']} {g['name']}: {format_mib(g['memory_reserved_mib'])} of "
        f"{format_mib(g['memory_total_mib'])} reserved, {format_mib(g['memory_free_observed_mib'])} free, "
        f"{'healthy' if g['healthy'] else 'UNHEALTHY'}, {len(g['running'])} running{_warm(g)}"
        for g in state["gpus"]
    )


def _warm(gpu: dict[str, Any]) -> str:
    """``, READY qwen2.5:7b`` for a GPU holding warm models (or loading one); nothing otherwise."""
    if not gpu.get("models") and gpu.get("state") not in ("loading", "unloading"):
        return ""
    return f", {str(gpu.get('state')).upper()} {', '.join(gpu.get('models') or ()) or '-'}"

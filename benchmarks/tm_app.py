"""The taskmesh side of the benchmarks: GPU, CPU, I/O and no-op tasks declared with
profiles, so routing, headers and admission all take part.

``make_app`` builds a fresh app for a broker: each scenario runs its own Redis, and a
Celery app caches its connection pools, so reusing one app across brokers would talk
to a Redis that is gone. Workers import the module-level ``app``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from benchmarks.work import burn_cpu, record
from taskmesh.app.celery_app import TaskmeshCelery, create_app
from taskmesh.app.placement import current_placement

GPU_VRAM = "4GiB"
#: Results go to a Redis list (``work.record``), the same way for both systems; several
#: apps in one process define the same names, so none is a shared task.
OPTIONS = {"time_limit": 600, "ignore_result": True, "shared": False}
NAMES = {kind: f"benchmarks.tm_app.{kind}" for kind in ("gpu", "cpu", "io", "noop_cpu", "noop_io")}


def make_app(broker: str | None = None, hardware: Path | None = None) -> TaskmeshCelery:
    app = create_app("benchmarks.tm_app", broker=broker, hardware=hardware)

    def done(task: Any, kind: str, label: Any, started: float, cpu_s: float = 0.0) -> None:
        placement = current_placement()
        record(task.app.conf.broker_url, kind, label, started, cpu_s, list(placement.gpu_uuids),
               placement.node, placement.queue)

    @app.task(bind=True, name=NAMES["gpu"], profile="gpu", vram=GPU_VRAM, **OPTIONS)
    def gpu(self: Any, seconds: float, label: Any = None) -> None:
        """Holds its admitted GPU for *seconds* (a stand-in for a forward pass)."""
        started = time.time()
        time.sleep(seconds)
        done(self, "gpu", label, started)

    @app.task(bind=True, name=NAMES["cpu"], profile="cpu_intensive", cpu_threads=1, **OPTIONS)
    def cpu(self: Any, seconds: float, label: Any = None) -> None:
        started = time.time()
        done(self, "cpu", label, started, burn_cpu(seconds))

    @app.task(bind=True, name=NAMES["io"], profile="io", **OPTIONS)
    def io(self: Any, seconds: float, label: Any = None) -> None:
        started = time.time()
        time.sleep(seconds)
        done(self, "io", label, started)

    @app.task(name=NAMES["noop_cpu"], profile="cpu_intensive", **OPTIONS)
    def noop_cpu() -> None:
        """Nothing: what is left is the cost of getting a task to a worker and back."""

    @app.task(name=NAMES["noop_io"], profile="io", **OPTIONS)
    def noop_io() -> None:
        """Nothing, on the profile whose admission needs no ledger."""

    return app


app = make_app()

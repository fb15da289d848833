"""The tasks of scenario 13 (warm-model affinity): three declared models whose loaders
sleep like models of different sizes loading, and one task per model that records which
GPU ran it. ``TASKMESH_BENCH_LOAD_SCALE`` scales the load times and
``TASKMESH_BENCH_MODEL_GIB`` sets each model's memory (the smoke run's toy size)."""

from __future__ import annotations

import os
import socket
import time
from typing import Any

from benchmarks.work import record
from taskmesh.app.celery_app import TaskmeshCelery, create_app
from taskmesh.app.placement import current_placement

LOAD_S = {"m2": 2.0, "m5": 5.0, "m10": 10.0}  # each model's load time, also declared as its load_s
SCALE_ENV = "TASKMESH_BENCH_LOAD_SCALE"
MODEL_GIB_ENV = "TASKMESH_BENCH_MODEL_GIB"  # 8 (the default): three do not fit on one 24 GiB GPU beside a task
OPTIONS = {"ignore_result": True, "shared": False, "time_limit": 600}


def task_name(model: str) -> str:
    return f"benchmarks.model_apps.use_{model}"


def _declare(app: TaskmeshCelery, model: str, scale: float, gib: str) -> None:
    def load() -> str:
        time.sleep(LOAD_S[model] * scale)
        return model

    app.model(model, vram=f"{gib}GiB", load_s=LOAD_S[model] * scale)(load)

    def use(seconds: float, label: Any = None) -> None:
        started = time.time()
        time.sleep(seconds)
        record(app.conf.broker_url, "gpu", label, started, 0.0, list(current_placement().gpu_uuids),
               socket.gethostname(), None, model=model)

    use.__name__ = f"use_{model}"
    app.task(name=task_name(model), profile="gpu", vram="1GiB", model=model, **OPTIONS)(use)


def make_app(broker: str | None = None) -> TaskmeshCelery:
    """The app, configured from the environment as it is now (``TASKMESH_AFFINITY`` included)."""
    made = create_app("benchmarks.model_apps", broker=broker)
    scale, gib = float(os.environ.get(SCALE_ENV) or 1.0), os.environ.get(MODEL_GIB_ENV) or "8"
    for model in LOAD_S:
        _declare(made, model, scale, gib)
    return made


app = make_app()

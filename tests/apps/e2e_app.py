"""The app the end-to-end tests start real workers for: each task reports where it ran."""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any

import redis

from taskmesh import create_app
from taskmesh.app.placement import current_placement

app = create_app("tests.apps.e2e_app")
if os.environ.get("TASKMESH_TEST_MAX_CONNECTIONS"):  # a Redis that allows few clients per worker
    app.conf.broker_transport_options["max_connections"] = int(os.environ["TASKMESH_TEST_MAX_CONNECTIONS"])
RUNS = "tests:e2e:runs"  # each run of ``counted``, by label


def _where(label: Any = None) -> dict[str, Any]:
    return {
        **dataclasses.asdict(current_placement()),
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "label": label,
        "at": time.time(),
    }


@app.task(profile="gpu", vram="4GiB", time_limit=300)
def on_gpu(seconds: float = 0.0, label: Any = None) -> dict[str, Any]:
    time.sleep(seconds)
    return _where(label)


@app.task(profile="cpu_intensive", time_limit=300)
def on_cpu(seconds: float = 0.0, label: Any = None) -> dict[str, Any]:
    time.sleep(seconds)
    return _where(label)


@app.task(profile="io", time_limit=300)
def on_io(seconds: float = 0.0, label: Any = None) -> dict[str, Any]:
    time.sleep(seconds)
    return _where(label)


@app.task(profile="io", time_limit=300)
def counted(seconds: float = 0.0, label: Any = None) -> None:
    time.sleep(seconds)
    redis.Redis.from_url(app.conf.broker_url).rpush(RUNS, str(label))


@app.task(profile="mixed", fallback="cpu", time_limit=300)
def on_mixed(seconds: float = 0.0, label: Any = None) -> dict[str, Any]:
    time.sleep(seconds)
    return _where(label)


@app.task(time_limit=300)
def undeclared(label: Any = None) -> dict[str, Any]:
    return _where(label)

"""Declared models for the warm-model tests: loaders that sleep like a small model loading,
and tasks that report which loaded object they got. Loads and unloads are recorded in Redis."""

from __future__ import annotations

import os
import time
from typing import Any

import redis

from taskmesh import create_app, current_model, current_model_name
from taskmesh.app.placement import current_placement

app = create_app("tests.apps.model_app")
LOAD_SLEEP_S = float(os.environ.get("TASKMESH_TEST_LOAD_S") or 1.0)
EVENTS = "test:model-events"  # "load:<name>:<pid>", "unload:<name>:<pid>"


def _note(event: str) -> None:
    redis.Redis.from_url(app.conf.broker_url).rpush(EVENTS, f"{event}:{os.getpid()}")


def _loader(name: str):
    def load() -> dict[str, Any]:
        time.sleep(LOAD_SLEEP_S)
        _note(f"load:{name}")
        return {"name": name, "pid": os.getpid(), "loaded_at": time.time()}

    load.__name__ = f"load_{name}"
    return load


def _unload(obj: dict[str, Any]) -> None:
    _note(f"unload:{obj['name']}")


cheap = app.model("cheap", vram="16GiB", load_s=1)(_loader("cheap"))
cheap.unloader(_unload)
dear = app.model("dear", vram="16GiB", load_s=60, unloader=_unload)(_loader("dear"))
# the affinity tests: declared 20 s, loaded in TASKMESH_TEST_LOAD_S (2 s there): learned 0.3 x 2 + 0.7 x 20 = 14.6 s
alpha = app.model("alpha", vram="16GiB", load_s=20, unloader=_unload)(_loader("alpha"))
brain = app.model("brain", vram="16GiB", load_s=1, never_evict=True, unloader=_unload)(_loader("brain"))


large_model = app.model("large", vram="16GiB", load_s=1)(_loader("large"))
small_model = app.model("small", vram="6GiB", load_s=1)(_loader("small"))


@app.model("broken", vram="8GiB")
def broken() -> None:  # fails at once, before its worker's next update sees it loading
    raise OSError("weights not found at /models/broken")


def _report(seconds: float) -> dict[str, Any]:
    time.sleep(seconds)
    model = current_model()
    return {"model": model["name"], "pid": model["pid"], "loaded_at": model["loaded_at"],
            "gpus": list(current_placement().gpu_uuids)}


@app.task(profile="gpu", vram="1GiB", model="cheap", time_limit=120)
def use_cheap(seconds: float = 0.05) -> dict[str, Any]:
    return _report(seconds)


@app.task(profile="gpu", vram="1GiB", model="dear", time_limit=120)
def use_dear(seconds: float = 0.05) -> dict[str, Any]:
    return _report(seconds)


@app.task(profile="gpu", vram="1GiB", model="brain", time_limit=120)
def use_brain(seconds: float = 0.05) -> dict[str, Any]:
    return _report(seconds)


@app.task(profile="gpu", vram="1GiB", model="alpha", time_limit=120)
def use_alpha(seconds: float = 0.05) -> dict[str, Any]:
    return _report(seconds)


@app.task(profile="gpu", model="cheap", time_limit=120)
def use_cheap_only(seconds: float = 0.05) -> dict[str, Any]:
    """No ``vram`` of its own: it needs the model's memory and nothing more."""
    return _report(seconds)


@app.task(profile="gpu", model="broken", time_limit=120)
def use_broken() -> dict[str, Any]:
    return _report(0)


@app.task(profile="gpu", vram="16GiB", time_limit=120)
def plain(seconds: float = 0.05) -> dict[str, Any]:
    """No model: 16 GiB of its own, which an idle warm model may be holding."""
    started = time.time()
    time.sleep(seconds)
    return {"gpus": list(current_placement().gpu_uuids), "started": started, "ended": time.time()}


@app.task(profile="gpu", vram="4GiB", time_limit=120)
def frame(seconds: float) -> dict[str, Any]:
    """An item of an exclusive batch (a video frame to transcribe, say)."""
    started = time.time()
    time.sleep(seconds)
    return {"gpus": list(current_placement().gpu_uuids), "started": started, "ended": time.time()}


@app.task(profile="gpu", vram="1GiB", model=["large", "small"], time_limit=120)
def use_best(seconds: float = 0.05) -> dict[str, Any]:
    """Degrade under pressure: the large model if it fits now, else the small one (warm ones first)."""
    return {**_report(seconds), "chosen": current_model_name()}


@app.task(profile="gpu", vram="12GiB", time_limit=120)
def hold12(seconds: float) -> dict[str, Any]:
    time.sleep(seconds)
    return {"gpus": list(current_placement().gpu_uuids)}


@app.task(profile="gpu", vram="4GiB", time_limit=120)
def small(seconds: float = 0.05) -> dict[str, Any]:
    """No model: 4 GiB, which fits beside a warm 16 GiB model on a 24 GiB GPU."""
    time.sleep(seconds)
    return {"gpus": list(current_placement().gpu_uuids)}


@app.task(profile="gpu", model="alpha", batch_size=4, batch_wait="300ms", time_limit=120)
def embed_alpha(items: list[Any]) -> list[dict[str, Any]]:
    """A micro-batch task for a model: every item reports where it ran."""
    return [{"item": item, "gpus": list(current_placement().gpu_uuids), "pid": current_model()["pid"]}
            for item in items]

"""Tasks written the ways Celery users write them besides ``@app.task``: ``@shared_task``,
a custom ``base=``, and a beat schedule set after ``create_app``."""

from __future__ import annotations

import dataclasses
import time
from typing import Any

from celery import Task, shared_task

from taskmesh import create_app
from taskmesh.app.placement import current_placement

app = create_app("tests.apps.seams_app")
app.conf.beat_schedule = {"seams-tick": {"task": "tests.apps.seams_app.tick", "schedule": 1.0}}


class Audited(Task):
    """A user's own base class: plain Celery, knowing nothing of taskmesh."""

    audited = "by Audited"

    def before_start(self, task_id: str, args: Any, kwargs: Any) -> None:
        self.started_by = self.audited


def _where() -> dict[str, Any]:
    return {**dataclasses.asdict(current_placement()), "at": time.time()}


@shared_task(name="tests.apps.seams_app.shared_gpu", profile="gpu", vram="10GiB", time_limit=120)
def shared_gpu() -> dict[str, Any]:
    return _where()


@app.task(bind=True, base=Audited, profile="gpu", vram="10GiB", time_limit=120)
def custom_gpu(self: Any) -> dict[str, Any]:
    return {**_where(), "base": self.started_by}


@app.task(profile="cpu_intensive", time_limit=120)
def step(seconds: float = 0.0, label: Any = None) -> Any:
    time.sleep(seconds)
    return label


@app.task(profile="io", time_limit=60)
def tick() -> None:
    return None


@app.task(bind=True, profile="cpu_intensive", time_limit=120)
def retry_once(self: Any) -> int:
    if not self.request.retries:
        raise self.retry(countdown=0)
    return self.request.retries

"""Batch jobs: many items of one task submitted together, followed and cancelled as one.

``submit_batch(task, items)`` sends one message per item (``task.apply_async((item,))``,
so a ``batch_size`` task micro-batches them, and each is admitted, retried and stored
as any other) under task ids chosen first and recorded with the job in Redis
(``state.batches``), before anything is sent, so the job can be followed from the first
item. ``batch_status`` reads the items' states from the result backend: each item counts
once however often it was delivered, and no worker needs to know about jobs.
``cancel_batch`` revokes the items that have not started (Celery's ``revoke``, without
terminating the running ones).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from celery.utils import uuid

from taskmesh.core.errors import TaskmeshError
from taskmesh.core.headers import BATCH_HEADER
from taskmesh.core.need_queues import EXCLUSIVE_QUEUE
from taskmesh.state.batches import create_job, job, job_progress, mark_cancelled, newest_jobs, result_states
from taskmesh.state.exclusive import ExclusiveBatches
from taskmesh.state.once import keep_done_s

NOT_STARTED = ("PENDING", "RECEIVED", "RETRY")


class UnknownBatch(TaskmeshError):
    """No batch job under this id (a typo, or it expired with its results)."""


class ExclusiveRefused(TaskmeshError):
    """``submit_batch(exclusive=True)`` cannot start: not a GPU task, or another exclusive batch runs."""


def submit_batch(task: Any, items: Iterable[Any], exclusive: bool = False, reload_after: bool = True,
                 **options: Any) -> str:
    """Send one call of *task* per item (the item is its one argument); returns the batch id.

    *options* are ``apply_async``'s (``priority``, ``queue``, ``countdown`` ...), for every item.
    ``exclusive=True`` (a GPU task) gives the batch every GPU: GPU workers stop starting other
    GPU work (it waits in its queues), let what runs finish, unload their models, run the
    batch, then load again the models that were warm (``reload_after``) and go back to the rest.
    """
    items = list(items)
    batch_id = uuid()
    task_ids = [uuid() for _ in items]
    if exclusive:
        options = _exclusive_options(task, batch_id, len(items), reload_after, options)
    create_job(task.app.redis(), batch_id, task.name, task_ids, keep_done_s(task.app.conf.result_expires))
    for task_id, item in zip(task_ids, items, strict=True):
        task.apply_async((item,), task_id=task_id, **options)
    return batch_id


def _exclusive_options(task: Any, batch_id: str, total: int, reload_after: bool,
                       options: dict[str, Any]) -> dict[str, Any]:
    requirement = getattr(task, "requirement", None)
    if requirement is None or not requirement.needs_gpu:
        raise ExclusiveRefused(f"submit_batch({task.name}, exclusive=True): only a GPU task can have every GPU; "
                               "declare it with profile='gpu', or leave exclusive out")
    running = ExclusiveBatches(task.app.redis()).begin(batch_id, task.name, total, reload_after)
    if running is not None:
        raise ExclusiveRefused(f"exclusive batch {running} is running: one at a time; wait for it "
                               f"(taskmesh batch status {running}) or cancel it")
    headers = {**(options.get("headers") or {}), BATCH_HEADER: batch_id}
    return {**options, "queue": EXCLUSIVE_QUEUE, "headers": headers}


def _job(app: Any, batch_id: str) -> tuple[dict[str, str], list[str], list[str]]:
    found = job(app.redis(), batch_id)
    if found is None:
        raise UnknownBatch(f"no batch {batch_id!r}: check the id submit_batch returned (jobs are kept as long as "
                           "their results, result_expires)")
    record, task_ids = found
    keys = [app.backend.get_key_for_task(task_id) for task_id in task_ids]
    return record, task_ids, list(result_states(app.backend.client, keys))


def batch_status(app: Any, batch_id: str) -> dict[str, Any]:
    """total, done, failed, revoked, progress (0..1), elapsed_s and eta_s (``None`` until one item ended)."""
    record, _, states = _job(app, batch_id)
    exclusive = (ExclusiveBatches(app.redis()).current() or {}).get("batch") == batch_id
    return {"id": batch_id, **job_progress(record, states), "exclusive": exclusive}


def recent_batches(app: Any, count: int = 3) -> list[dict[str, Any]]:
    """``batch_status`` of the *count* jobs submitted last (for ``status`` and ``top``)."""
    shown = []
    for batch_id in newest_jobs(app.redis(), count):
        try:
            shown.append(batch_status(app, batch_id))
        except UnknownBatch:  # expired with its results
            continue
    return shown


def cancel_batch(app: Any, batch_id: str) -> int:
    """Revoke the job's items that have not started; how many."""
    record, task_ids, states = _job(app, batch_id)
    waiting = [task_id for task_id, state in zip(task_ids, states, strict=True) if state in NOT_STARTED]
    mark_cancelled(app.redis(), batch_id)
    if waiting:
        app.control.revoke(waiting, reply=True, timeout=1.0)
    return len(waiting)

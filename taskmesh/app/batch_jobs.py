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

import datetime
from collections.abc import Iterable
from typing import Any

from celery.utils import uuid

from taskmesh.core.errors import TaskmeshError
from taskmesh.state.batches import create_job, job, job_progress, mark_cancelled, newest_jobs, result_states

NOT_STARTED = ("PENDING", "RECEIVED", "RETRY")


class UnknownBatch(TaskmeshError):
    """No batch job under this id (a typo, or it expired with its results)."""


def _keep_s(app: Any) -> int:
    expires = app.conf.result_expires
    if isinstance(expires, datetime.timedelta):
        return int(expires.total_seconds()) or 86400
    return int(expires or 86400)


def submit_batch(task: Any, items: Iterable[Any], **options: Any) -> str:
    """Send one call of *task* per item (the item is its one argument); returns the batch id.

    *options* are ``apply_async``'s (``priority``, ``queue``, ``countdown`` ...), for every item.
    """
    items = list(items)
    batch_id = uuid()
    task_ids = [uuid() for _ in items]
    create_job(task.app.redis(), batch_id, task.name, task_ids, _keep_s(task.app))
    for task_id, item in zip(task_ids, items, strict=True):
        task.apply_async((item,), task_id=task_id, **options)
    return batch_id


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
    return {"id": batch_id, **job_progress(record, states)}


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

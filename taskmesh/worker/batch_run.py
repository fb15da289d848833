"""One batch on the pool: the function called once with every item, each item's result
stored under its own task id, then each item's request ended as Celery ends one.

``run_batch`` runs in the pool process (prefork's child, or a thread): it calls the
task's function with the list of items, stores each item's result or exception with the
result backend's own ``mark_as_done``/``mark_as_failure`` (under the item's task id,
with its request, so chords and ``result_extended`` work), remembers cacheable results,
and adds the batch to the per-task statistics. It returns one ``(state, text)`` per item:
``ok``, ``failed``, or ``retried`` for an item the function gave back as ``RetryItem``
(sent again by Celery's own ``Task.retry``, under the item's request).

After a success it sends what Celery's trace sends (``link`` callbacks, the chain's next
step); after a failure, Celery's ``task_failure`` (dead letters listen).

``BatchOutcome`` is the parent's side: Celery's own ``Request.on_accepted`` (``task-started``
events), ``on_success``, ``on_failure`` and ``on_retry`` per item, so every message is acknowledged only
after its item's result is stored, and a hard time limit or a lost pool process ends each
item as Celery ends a request that met it. A worker killed before that leaves every
message unacknowledged.
"""

from __future__ import annotations

import dataclasses
import os
import time
import traceback
from collections.abc import Callable
from typing import Any

from celery import current_app, signals, signature
from celery._state import _task_stack
from celery.app.task import Context
from celery.exceptions import Retry
from celery.utils.saferepr import saferepr

from taskmesh.core.batching import RetryItem, cache_key
from taskmesh.state.batches import record_batch, remember
from taskmesh.state.client import state_client

_clients: dict[int, Any] = {}


class BatchItemFailed(Exception):
    """An item of a batch failed; its stored result holds the exception the function gave."""


@dataclasses.dataclass
class ItemFailure:
    """What Celery's ``Request.on_failure`` reads of an exception: the exception and its traceback."""

    exception: BaseException
    traceback: str | None = None
    exc_info: Any = None


def _client(app: Any) -> Any:
    if id(app) not in _clients:
        _clients[id(app)] = state_client(app)
    return _clients[id(app)]


def run_batch(name: str, batch_id: str, items: list[tuple[str, Any, dict[str, Any]]],
              admitted: dict[str, Any], fill_s: float = 0.0) -> tuple[list[tuple[str, str]], float]:
    """In the pool: call *name*'s function on the items; store every item's outcome; (outcomes, seconds)."""
    app = current_app._get_current_object()
    task = app.tasks[name]
    started = time.monotonic()
    values = [item for _, item, _ in items]
    context = Context(id=batch_id, task=name, batch=[tid for tid, _, _ in items], called_directly=False,
                      delivery_info=items[0][2].get("delivery_info"), hostname=items[0][2].get("hostname"),
                      **admitted)  # the GPUs (and warm model) admission gave the batch
    if task.track_started:  # as Celery's trace does: AsyncResult.state, Flower and cancel_batch see it started
        for task_id, _, request in items:
            task.backend.store_result(task_id, {"pid": os.getpid(), "hostname": request.get("hostname")}, "STARTED",
                                      request=Context(request))
    _task_stack.push(task)
    task.request_stack.push(context)
    try:
        outcomes = _call(task, values)
    finally:
        task.pop_request()
        _task_stack.pop()
    seconds = time.monotonic() - started
    stored = [_store(task, tid, request, outcome) for (tid, _, request), outcome in zip(items, outcomes, strict=True)]
    signals.task_postrun.send(sender=task, task_id=batch_id, task=task, args=(values,), kwargs={},
                              retval=None, state="SUCCESS")
    try:
        record_batch(_client(app), name, len(items), seconds, fill_s)
    except Exception:  # statistics must not fail the items whose results are stored
        pass
    return stored, seconds


def _call(task: Any, values: list[Any]) -> list[Any]:
    """One outcome per item: a value, or an exception (raised: for every item)."""
    try:
        results = task.run_items(values)
        results = list(results)
    except Exception as exc:
        exc.__taskmesh_tb__ = traceback.format_exc()  # type: ignore[attr-defined]
        return [exc] * len(values)
    if len(results) != len(values):
        error = ValueError(f"batch task {task.name} returned {len(results)} results for {len(values)} items; "
                           "return one result per item, in order")
        return [error] * len(values)
    return results


def _store(task: Any, task_id: str, request: dict[str, Any], outcome: Any) -> tuple[str, str]:
    context = Context(request, called_directly=False)
    keep = not (task.ignore_result if request.get("ignore_result") is None else request["ignore_result"])
    if isinstance(outcome, RetryItem):
        return _retried(task, task_id, context, outcome, keep)
    if isinstance(outcome, BaseException):
        return _failed(task, task_id, context, outcome, getattr(outcome, "__taskmesh_tb__", None), keep)
    try:
        task.backend.mark_as_done(task_id, outcome, request=context, store_result=keep)
    except Exception as exc:  # a result the serializer refuses fails that item only
        return _failed(task, task_id, context, exc, traceback.format_exc(), keep)
    _follow_on(task, task_id, request, outcome)
    batching = task.batching
    if batching is not None and batching.cache_ttl_s is not None:
        remember(_client(task.app), task.name, cache_key(task.name, request.get("args"), request.get("kwargs")),
                 outcome, batching.cache_ttl_s)
    return "ok", saferepr(outcome, task.resultrepr_maxsize)


def _retried(task: Any, task_id: str, context: Context, outcome: RetryItem, keep: bool) -> tuple[str, str]:
    """Send the item again as ``self.retry()`` would from its own run, and store ``RETRY``."""
    task.request_stack.push(context)
    try:
        task.retry(exc=outcome.exc, countdown=outcome.countdown, throw=False)
    except Exception as exc:  # past max_retries: the item fails with its exception
        return _failed(task, task_id, context, exc, traceback.format_exc(), keep)
    finally:
        task.request_stack.pop()
    reason = outcome.exc if outcome.exc is not None else outcome
    task.backend.mark_as_retry(task_id, reason, request=context)
    return "retried", saferepr(reason)


def _follow_on(task: Any, task_id: str, request: dict[str, Any], value: Any) -> None:
    """What Celery's trace sends after a success: the ``link`` callbacks, then the chain's next step."""
    root = request.get("root_id") or task_id
    for callback in request.get("callbacks") or ():
        signature(callback, app=task.app).apply_async((value,), parent_id=task_id, root_id=root)
    chain = request.get("chain")
    if chain:
        signature(chain[-1], app=task.app).apply_async((value,), chain=chain[:-1], parent_id=task_id, root_id=root)


def _failed(task: Any, task_id: str, context: Context, exc: BaseException, tb: str | None,
            keep: bool) -> tuple[bool, str]:
    """Store the item's failure and send Celery's ``task_failure`` for it (dead letters listen), as its own request."""
    task.backend.mark_as_failure(task_id, exc, traceback=tb, request=context,
                                 store_result=keep or task.store_errors_even_if_ignored)
    task.request_stack.push(context)
    try:
        signals.task_failure.send(sender=task, task_id=task_id, exception=exc, args=context.args,
                                  kwargs=context.kwargs, traceback=tb, einfo=None)
    finally:
        task.request_stack.pop()
    return "failed", saferepr(exc)


@dataclasses.dataclass
class BatchOutcome:
    """The parent's callbacks for one batch's pool job."""

    requests: list[Any]
    ended: Callable[[], None]  # the batch is over: release its admission

    def accepted(self, pid: int, time_accepted: float) -> None:
        for request in self.requests:
            request.on_accepted(pid, time_accepted)

    def returned(self, value: tuple[list[tuple[str, str]], float]) -> None:
        outcomes, seconds = value
        try:
            for request, (state, text) in zip(self.requests, outcomes, strict=True):
                if state == "ok":
                    request.on_success((False, text, seconds))
                elif state == "retried":  # Celery's on_failure sees Retry: task-retried, acknowledged
                    request.on_success((True, ItemFailure(Retry(exc=BatchItemFailed(text))), seconds))
                else:
                    request.on_success((True, ItemFailure(BatchItemFailed(text)), seconds))
        finally:
            self.ended()

    def failed(self, exc_info: Any) -> None:
        """The pool job itself failed: a hard time limit, or the pool process was lost."""
        try:
            for request in self.requests:
                request.on_failure(exc_info)
        finally:
            self.ended()

"""The app side of micro-batching and result caching.

A task declared with ``batch_size`` gets taskmesh's batching strategy (named by string,
as ``TaskmeshTask.Strategy`` is, so importing an app never imports the worker layer);
each call carries one item, so ``.delay(item)`` is checked here, at submit.

A task declared with ``cache_ttl`` is looked up before it is sent: a call with the same
arguments within the TTL stores the cached value as this call's result, under a new task
id, and returns its ``AsyncResult`` without sending anything (counted as
``cache_hits``). Calls that chain on (``link``, a chain) are always sent, so their
callbacks run. Results are remembered by the worker when a run succeeds.
"""

from __future__ import annotations

from typing import Any

from celery.utils import uuid

from taskmesh.core.batching import Batching, batching_from_options, cache_key
from taskmesh.core.requirements import Requirement
from taskmesh.state.batches import cached, remember

BATCH_STRATEGY = "taskmesh.worker.batching:batch_strategy"
SENT_ANYWAY = ("link", "link_error", "chain", "chord")


def batch_task_options(name: str, options: dict[str, Any], requirement: Requirement) -> dict[str, Any]:
    """Class attributes for a task declared with batching or caching options (none without)."""
    batching = batching_from_options(name, options, requirement)
    if batching is None:
        return {}
    if batching.size is None:
        return {"batching": batching}
    return {"batching": batching, "Strategy": BATCH_STRATEGY}


def check_batch_call(task: Any, args: Any, kwargs: Any) -> None:
    """A batch task takes one item per call: ``.delay(item)``."""
    if len(args or ()) != 1 or kwargs:
        raise TypeError(f"{task.name} batches its calls (batch_size={task.batching.size}): send one item per call, "
                        f"as .delay(item) or .apply_async((item,)); got args={args!r} kwargs={kwargs!r}")


def cached_result(task: Any, args: Any, kwargs: Any, task_id: str | None, options: dict[str, Any]) -> Any:
    """The ``AsyncResult`` of a cached call, or ``None`` when it must be sent."""
    batching: Batching | None = getattr(task, "batching", None)
    if batching is None or batching.cache_ttl_s is None or any(options.get(k) for k in SENT_ANYWAY):
        return None
    found, value = cached(task.app.redis(), task.name, cache_key(task.name, args, kwargs))
    if not found:
        return None
    task_id = task_id or uuid()
    task.backend.mark_as_done(task_id, value)
    return task.AsyncResult(task_id)


def remember_result(task: Any, args: Any, kwargs: Any, value: Any) -> None:
    """After a successful run: keep *value* for calls with the same arguments, if the task caches."""
    batching: Batching | None = getattr(task, "batching", None)
    if batching is not None and batching.cache_ttl_s is not None:
        remember(task.app.redis(), task.name, cache_key(task.name, args, kwargs), value, batching.cache_ttl_s)

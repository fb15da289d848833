"""``TaskmeshTask``: the task base of every taskmesh app.

At submit it names priorities (the requirement header, the queue and the submit checks
are ``TaskmeshCelery.send_task``'s, which this ``apply_async`` ends in, as every send
does); on the worker its ``Strategy`` and ``Request`` route messages through admission
(``taskmesh.worker``), named by string so that importing an app never imports the
worker layer. A task declared with a ``base=`` of its own gets this class mixed in
behind that base (``with_taskmesh``), so it is admitted as any other.
"""

from __future__ import annotations

from typing import Any

from celery import Task

from taskmesh.app.batching import cached_result, check_batch_call, remember_result
from taskmesh.app.once import mark_body_returned
from taskmesh.app.progress import report_progress
from taskmesh.app.sending import RETURNED, name_priority
from taskmesh.app.warm import run_warm
from taskmesh.core.batching import Batching
from taskmesh.core.requirements import Requirement

_MIXED: dict[type, type] = {}


class TaskmeshTask(Task):
    """Task base: names priorities, and marks when its body has returned.

    A declared priority is applied here rather than as Celery's ``Task.priority``
    attribute, which Celery 5.7 deprecates in favour of routing, and before Celery
    merges the app's default priority under the caller's options.
    """

    requirement: Requirement = Requirement()
    Strategy = "taskmesh.worker.strategy:admission_strategy"
    Request = "taskmesh.worker.strategy:AdmittedRequest"

    batching: Batching | None = None  # batch_size / cache_ttl (``app.batching``)

    def apply_async(self, args: Any = None, kwargs: Any = None, task_id: Any = None, **options: Any) -> Any:
        name_priority(options, self.requirement.priority)
        if self.batching is not None:
            if self.batching.size is not None:
                check_batch_call(self, args, kwargs)
            hit = cached_result(self, args, kwargs, task_id, options)
            if hit is not None:
                return hit
        return super().apply_async(args, kwargs, task_id, **options)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        # What a worker sends after this returns (the next chain step, callbacks, a chord
        # body) is sent for a finished task and must not be refused (``app.sending``).
        request = self.request
        try:
            if request.called_directly:
                return super().__call__(*args, **kwargs)
            value = run_warm(self, lambda: super(TaskmeshTask, self).__call__(*args, **kwargs))
            if getattr(self, "once", False) and not request.is_eager:
                mark_body_returned(self)
            if self.batching is not None:
                remember_result(self, args, kwargs, value)
            return value
        finally:
            if not request.called_directly:
                setattr(request, RETURNED, True)

    def run_items(self, items: list[Any]) -> Any:
        """One micro-batch (``batch_size``): the function on the list of items, with the task's
        warm model loaded as for any run (``app.warm``); the worker's ``batch_run`` calls it."""
        return run_warm(self, lambda: self.run(items))

    def progress(self, done: float, total: float) -> None:
        """How far this run is (bound tasks): ``taskmesh top`` shows a bar and an ETA, Flower a PROGRESS state."""
        report_progress(self, done, total)


def with_taskmesh(base: type) -> type:
    """*base* with ``TaskmeshTask`` behind it in the MRO: the user's methods and attributes
    win, and taskmesh's strategy, request and priority naming fill in the rest."""
    if issubclass(base, TaskmeshTask):
        return base
    if base not in _MIXED:
        _MIXED[base] = type(base.__name__, (base, TaskmeshTask),
                            {"__module__": base.__module__, "__doc__": base.__doc__})
    return _MIXED[base]

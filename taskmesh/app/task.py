"""``TaskmeshTask``: the task base of every taskmesh app.

At submit it names priorities and stamps the requirement and the enqueue time into
the headers, then runs the submit checks (``app.submit``); on the worker its
``Strategy`` and ``Request`` route messages through admission (``taskmesh.worker``),
named by string so that importing an app never imports the worker layer.
"""

from __future__ import annotations

import time
from typing import Any

from celery import Task

from taskmesh.app.broker_errors import broker_errors
from taskmesh.app.progress import report_progress
from taskmesh.core.headers import ENQUEUED_AT, REQUIREMENT_HEADER
from taskmesh.core.profiles import Priority
from taskmesh.core.requirements import Requirement


class TaskmeshTask(Task):
    """Task base: names priorities and stamps the requirement into the headers.

    A declared priority is applied here rather than as Celery's ``Task.priority``
    attribute, which Celery 5.7 deprecates in favour of routing.
    """

    requirement: Requirement = Requirement()
    Strategy = "taskmesh.worker.strategy:admission_strategy"
    Request = "taskmesh.worker.strategy:AdmittedRequest"

    def apply_async(self, args: Any = None, kwargs: Any = None, task_id: Any = None, **options: Any) -> Any:
        urgency = options.pop("urgency", None)
        if urgency is not None:
            options["priority"] = int(Priority.from_urgency(urgency))
        elif options.get("priority") is not None:
            options["priority"] = Priority.parse(options["priority"])
        elif self.requirement.priority is not None:
            options["priority"] = self.requirement.priority
        options["headers"] = {
            **(options.get("headers") or {}),
            REQUIREMENT_HEADER: self.requirement.to_header(),
            ENQUEUED_AT: time.time(),
        }
        policy = getattr(self.app, "submit_policy", None)
        if policy is None:
            return super().apply_async(args, kwargs, task_id, **options)
        with broker_errors(self.app):
            policy().prepare(self.name, self.requirement, options)
            return super().apply_async(args, kwargs, task_id, **options)

    def progress(self, done: float, total: float) -> None:
        """How far this run is (bound tasks): ``taskmesh top`` shows a bar and an ETA, Flower a PROGRESS state."""
        report_progress(self, done, total)

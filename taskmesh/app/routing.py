"""Profile → queue routing, as a plain Celery router function, after the user's routes.

``TaskmeshAMQP`` (the app's ``amqp`` class) builds Celery's route table as the user's
``task_routes`` first, then ``route_by_profile``: Celery takes the first route that
answers, so a user route wins where it names a task, and every other task still goes to
its profile's queue. That holds for ``task_routes`` given to ``create_app`` and for one
set later (``app.conf.task_routes = ...``; Celery rebuilds the table on that change).

Celery merges a router's answer *under* the caller's options (``lpmerge``), so
``apply_async(queue=...)`` keeps winning, as Celery users expect. The requirement
itself is stamped into the headers by ``TaskmeshCelery.send_task`` rather than here:
a router's ``headers`` would be replaced wholesale by any ``headers=`` the caller
passes, and the requirement must survive that.

The submit checks (``app.sending``) must know the queue before the send, so they ask the
route table themselves; ``TaskmeshRouter`` then reuses that answer for the send, so a
user's router runs once per send — one with state (round robin) sends the message to the
queue that was checked.
"""

from __future__ import annotations

import functools
from typing import Any

from celery.app import routes
from celery.app.amqp import AMQP
from celery.utils.collections import lpmerge

from taskmesh.core.profiles import Profile


def route_by_profile(
    name: str, args: Any, kwargs: Any, options: dict[str, Any], task: Any = None, config: Any = None, **_: Any
) -> dict[str, str] | None:
    """Send a task to the queue of its declared profile, else of its ``tasks.<name>`` config
    entry (a task this process knows only by name); ``None`` leaves Celery's default."""
    requirement = getattr(task, "requirement", None)
    if requirement is not None:
        return {"queue": requirement.profile.queue}
    config = config or getattr(getattr(task, "app", None), "taskmesh_config", None)
    profile = config.tasks.get(name, {}).get("profile") if config is not None else None
    return {"queue": Profile.parse(profile).queue} if profile else None


ROUTE_OPTION = "taskmesh_route"  # the route table's answer, found by the submit checks


class TaskmeshRouter(routes.Router):
    """Celery's router, which takes the answer the submit checks already had from the table."""

    def route(self, options: dict[str, Any], name: str, args: Any = (), kwargs: Any = None,
              task_type: Any = None) -> dict[str, Any]:
        if ROUTE_OPTION not in options:
            return super().route(options, name, args, kwargs, task_type)
        options = dict(options)
        (route,) = options.pop(ROUTE_OPTION)
        options = self.expand_destination(options)
        if route:
            return lpmerge(self.expand_destination(route if isinstance(route, str) else dict(route)), options)
        if "queue" not in options:
            options = lpmerge(self.expand_destination(self.app.conf.task_default_queue), options)
        return options


class TaskmeshAMQP(AMQP):
    """Celery's ``AMQP`` whose route table ends with profile routing."""

    def Router(self, queues: Any = None, create_missing: Any = None) -> TaskmeshRouter:  # noqa: N802 (Celery's name)
        return TaskmeshRouter(self.routes, queues or self.queues,
                              self.app.either("task_create_missing_queues", create_missing), app=self.app)

    def flush_routes(self) -> None:
        table = [r for r in routes.prepare(self.app.conf.task_routes) if r is not route_by_profile]
        config = getattr(self.app, "taskmesh_config", None)
        self._rtable = [*table, functools.partial(route_by_profile, config=config)]

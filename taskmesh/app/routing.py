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
"""

from __future__ import annotations

import functools
from typing import Any

from celery.app import routes
from celery.app.amqp import AMQP

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


class TaskmeshAMQP(AMQP):
    """Celery's ``AMQP`` whose route table ends with profile routing."""

    def flush_routes(self) -> None:
        table = [r for r in routes.prepare(self.app.conf.task_routes) if r is not route_by_profile]
        config = getattr(self.app, "taskmesh_config", None)
        self._rtable = [*table, functools.partial(route_by_profile, config=config)]

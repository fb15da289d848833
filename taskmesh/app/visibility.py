"""The Redis visibility timeout, derived from the tasks' time limits once the app is
finalized.

A message is delivered again once it has been unacknowledged that long, counting
from delivery, not from start; with prefetch 1 and late acks it can wait behind one
running task and then run itself.
"""

from __future__ import annotations

import logging
from typing import Any

from taskmesh.core.requirements import Requirement

log = logging.getLogger(__name__)
MIN_VISIBILITY_TIMEOUT = 3600


def derive_visibility_timeout(sender: Any, **_: Any) -> None:
    """Raise the visibility timeout above what a prefetched-then-run task can take.

    With prefetch 1 and late acks a message can wait behind one running task and
    then run itself, so twice the longest time limit (plus a margin) must fit. A
    timeout the user set explicitly is kept, with a warning naming the task that
    can outlive it.
    """
    app = sender
    limits = {
        name: task.time_limit
        for name, task in app.tasks.items()
        if not name.startswith("celery.") and getattr(task, "time_limit", None)
    }
    unlimited = sorted(
        name
        for name, task in app.tasks.items()
        if not name.startswith("celery.")
        and not getattr(task, "time_limit", None)
        and getattr(task, "requirement", Requirement()).profile.queue != "cpu_light"
    )
    options = app.conf.broker_transport_options
    current = options.get("visibility_timeout", MIN_VISIBILITY_TIMEOUT)
    needed = max([MIN_VISIBILITY_TIMEOUT] + [2 * limit + 300 for limit in limits.values()])
    if needed > current:
        if app.visibility_timeout_is_explicit:
            longest = max(limits, key=limits.__getitem__)
            log.warning(
                "task %r has time_limit=%ss; the configured visibility_timeout=%ss can expire "
                "while it waits and runs, and the task would be delivered again; raise it to %ss",
                longest, limits[longest], current, needed,
            )
            return
        for key in ("broker_transport_options", "result_backend_transport_options"):
            app.conf[key] = {**app.conf[key], "visibility_timeout": needed}
        app.conf.visibility_timeout = needed
        current = needed
    if unlimited:
        log.warning(
            "tasks without time_limit can outlive the Redis visibility timeout (%ss) and be "
            "delivered twice; declare time_limit= on: %s",
            current, ", ".join(unlimited[:8]) + (" ..." if len(unlimited) > 8 else ""),
        )

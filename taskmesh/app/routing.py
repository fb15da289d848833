"""Profile → queue routing, as a plain Celery router function.

Celery merges a router's answer *under* the caller's options (``lpmerge``), so
``apply_async(queue=...)`` keeps winning, as Celery users expect. The requirement
itself is stamped into the headers by ``TaskmeshTask.apply_async`` rather than here:
a router's ``headers`` would be replaced wholesale by any ``headers=`` the caller
passes, and the requirement must survive that.
"""

from __future__ import annotations

from typing import Any

from taskmesh.core.profiles import Profile


def route_by_profile(
    name: str, args: Any, kwargs: Any, options: dict[str, Any], task: Any = None, **_: Any
) -> dict[str, str] | None:
    """Send a task to the queue of its declared profile; ``None`` leaves Celery's default."""
    requirement = getattr(task, "requirement", None)
    if requirement is not None:
        return {"queue": requirement.profile.queue}
    override = getattr(getattr(task, "app", None), "taskmesh_config", None)
    profile = override.tasks.get(name, {}).get("profile") if override is not None else None
    return {"queue": Profile.parse(profile).queue} if profile else None

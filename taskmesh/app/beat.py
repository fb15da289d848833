"""The beat entry of every taskmesh app: ``taskmesh.rebalance``, on the ``cpu_light``
queue (gevent) at CRITICAL priority, every ``rebalance.interval_s``."""

from __future__ import annotations

from typing import Any

from taskmesh.core.profiles import Priority


def schedule_rebalance(app: Any) -> None:
    """Register ``taskmesh.rebalance`` and run it on beat, at CRITICAL priority on gevent.

    ``expires`` drops a run that waited longer than one interval: the next one
    sees a fresher system anyway.
    """
    interval = app.taskmesh_config.rebalance.interval_s

    @app.task(name="taskmesh.rebalance", profile="io", shared=False, ignore_result=True, time_limit=60)
    def rebalance() -> dict[str, Any]:
        from taskmesh.app.rebalance import rebalance as run

        return run(app)

    schedule = {
        "taskmesh-rebalance": {
            "task": "taskmesh.rebalance",
            "schedule": interval,
            "options": {"priority": int(Priority.CRITICAL), "expires": interval},
        }
    }
    app.conf.beat_schedule = {**schedule, **(app.conf.beat_schedule or {})}

"""The beat entry of every taskmesh app: ``taskmesh.rebalance``, on the ``cpu_light``
queue (gevent) at CRITICAL priority, every ``rebalance.interval_s``.

The entry is merged into ``beat_schedule`` twice: at ``create_app``, so the setting shows
it at once, and again when the app is finalized (``on_after_finalize``, which ``celery
beat`` and ``worker -B`` reach before their scheduler reads the setting), so an app
that replaces ``app.conf.beat_schedule`` after ``create_app`` keeps the rebalancer. A
user entry under the same key wins.
"""

from __future__ import annotations

from typing import Any

from taskmesh.core.profiles import Priority

ENTRY = "taskmesh-rebalance"


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

    entry = {"task": "taskmesh.rebalance", "schedule": interval,
             "options": {"priority": int(Priority.CRITICAL), "expires": interval}}

    def merge(**_: Any) -> None:
        app.conf.beat_schedule = {ENTRY: entry, **(app.conf.beat_schedule or {})}

    merge()
    app.on_after_finalize.connect(merge, weak=False)

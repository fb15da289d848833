"""The app layer: ``create_app``, the task base, routing, the submit checks, the
rebalancer's beat task, progress and placement — ordinary Celery configuration, with
Celery's public API only.

May import ``core``, ``hardware`` and ``state``. The worker layer is named only by
string (``TaskmeshTask.Strategy``, the consumer bootstep), so importing an app never
imports it.
"""

from taskmesh.app.celery_app import BROKER_ENV, DEFAULT_BROKER, TaskmeshCelery, create_app
from taskmesh.app.task import TaskmeshTask

__all__ = ["BROKER_ENV", "DEFAULT_BROKER", "TaskmeshCelery", "TaskmeshTask", "create_app"]

"""The app layer: ``create_app``, the task base, routing, the submit checks, the
rebalancer's beat task, progress and placement, declared models (``models``) and the
pool process's warm copies of them (``warm``) — ordinary Celery configuration. Beyond
Celery's public API it extends three seams every task passes through, each named where
it is done: ``Celery._task_from_fun`` (every task class, ``@shared_task`` included),
``Celery.send_task`` (every send) and ``AMQP.flush_routes`` (the route table).

May import ``core``, ``hardware`` and ``state``. The worker layer is named only by
string (``TaskmeshTask.Strategy``, the consumer bootstep), so importing an app never
imports it.
"""

from taskmesh.app.celery_app import BROKER_ENV, DEFAULT_BROKER, TaskmeshCelery, create_app
from taskmesh.app.task import TaskmeshTask

__all__ = ["BROKER_ENV", "DEFAULT_BROKER", "TaskmeshCelery", "TaskmeshTask", "create_app"]

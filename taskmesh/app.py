"""``create_app``: a plain ``celery.Celery`` that knows what its tasks need.

Everything here is ordinary Celery configuration — queues, a router, a Task base
class, settings — so removing taskmesh leaves a working Celery app. The only
override of Celery's own API is ``task()``, so that a resource declaration is
validated at import (Celery itself creates task classes lazily).

Defaults are those that long GPU tasks need and that Celery does not ship with:
late acks, reject on worker loss, prefetch multiplier 1, JSON only, task events on
(so Flower sees tasks without ``-E``), and a Redis visibility timeout derived from
the longest declared time limit (a message is delivered again once it has been
unacknowledged that long, counting from delivery, not from start).
"""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import Any

from celery import Celery, Task, signals
from celery.utils.imports import gen_task_name
from kombu import Exchange, Queue

from .config import Config, load_config
from .errors import ConfigError, RequirementError
from .hardware import Inventory, detect
from .profiles import QUEUES, Priority
from .progress import report_progress
from .requirements import HEADER, REQUIREMENT_OPTIONS, Requirement
from .routing import route_by_profile

log = logging.getLogger(__name__)
DEFAULT_BROKER = "redis://127.0.0.1:6379/0"
BROKER_ENV = "TASKMESH_BROKER_URL"
ENQUEUED_AT = "taskmesh_enqueued_at"
MIN_VISIBILITY_TIMEOUT = 3600


class TaskmeshTask(Task):
    """Task base: names priorities and stamps the requirement into the headers.

    A declared priority is applied here rather than as Celery's ``Task.priority``
    attribute, which Celery 5.7 deprecates in favour of routing.
    """

    requirement: Requirement = Requirement()
    Strategy = "taskmesh.admission:admission_strategy"
    Request = "taskmesh.admission:AdmittedRequest"

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
            HEADER: self.requirement.to_header(),
            ENQUEUED_AT: time.time(),
        }
        policy = getattr(self.app, "submit_policy", None)
        if policy is not None:
            policy().prepare(self.name, self.requirement, options)
        return super().apply_async(args, kwargs, task_id, **options)

    def progress(self, done: float, total: float) -> None:
        """How far this run is (bound tasks): ``taskmesh top`` shows a bar and an ETA, Flower a PROGRESS state."""
        report_progress(self, done, total)


class TaskmeshCelery(Celery):
    """``Celery`` whose ``task()`` accepts and validates resource options."""

    taskmesh_config: Config
    visibility_timeout_is_explicit: bool = False

    def task(self, *args: Any, **opts: Any) -> Any:
        if len(args) == 1 and callable(args[0]):
            return self.task(**opts)(args[0])
        resources = {k: opts.pop(k) for k in REQUIREMENT_OPTIONS if k in opts}

        def declare(fun: Any) -> Any:
            name = opts.get("name") or gen_task_name(self, fun.__name__, fun.__module__)
            requirement = self._requirement(name, {**resources, "priority": opts.pop("priority", None)})
            return super(TaskmeshCelery, self).task(**dict(opts, requirement=requirement))(fun)

        return declare

    def _requirement(self, name: str, declared: dict[str, Any]) -> Requirement:
        config = self.taskmesh_config
        declared = {k: v for k, v in declared.items() if v is not None}
        # The code's own declaration first, so its errors name the task, not the file.
        Requirement.from_options(name, declared, config.default_profile)
        override = config.tasks.get(name)
        if not override:
            return Requirement.from_options(name, declared, config.default_profile)
        try:
            return Requirement.from_options(name, {**declared, **override}, config.default_profile)
        except RequirementError as exc:
            raise ConfigError(config.source, f"tasks.{name}", str(exc).split(": ", 1)[1]) from None

    def redis(self) -> Any:
        """A Redis client for the broker, shared by this process's producer-side checks."""
        if getattr(self, "_redis", None) is None:
            import redis

            self._redis = redis.Redis.from_url(self.conf.broker_url)
        return self._redis

    def submit_policy(self) -> Any:
        """Checks done before a message is sent (backpressure, feasibility, fallback)."""
        if getattr(self, "_submit_policy", None) is None:
            from .backpressure import SubmitPolicy

            self._submit_policy = SubmitPolicy(self)
        return self._submit_policy

    def inventory(self) -> Inventory:
        """This machine's hardware under this app's config (detected once, then cached)."""
        if getattr(self, "_inventory", None) is None:
            self._inventory = detect(self.taskmesh_config)
        return self._inventory


def create_app(
    main: str | None = None,
    broker: str | None = None,
    hardware: str | os.PathLike[str] | None = None,
    **celery_conf: Any,
) -> TaskmeshCelery:
    """A Celery app with taskmesh's queues, router, task base and defaults.

    *broker*: the argument, else ``TASKMESH_BROKER_URL``, else ``taskmesh up``'s
    local Redis. *hardware*: a config path or name (see ``config.find_config_file``).
    Any other keyword is Celery configuration and wins over taskmesh's defaults.
    """
    config = load_config(hardware)
    broker_url = broker or os.environ.get(BROKER_ENV) or DEFAULT_BROKER
    app = TaskmeshCelery(main, broker=broker_url, task_cls=TaskmeshTask, set_as_current=False)
    app.taskmesh_config = config
    timeout = config.admission.visibility_timeout_s or MIN_VISIBILITY_TIMEOUT
    transport = {"priority_steps": [0, 3, 6, 9], "visibility_timeout": timeout}
    app.conf.update(
        task_queues=[Queue(q, Exchange(q, type="direct"), routing_key=q) for q in QUEUES],
        task_default_queue=config.default_profile.queue,
        task_routes=(route_by_profile,),
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        result_accept_content=["json"],
        result_backend=broker_url if broker_url.startswith(("redis://", "rediss://")) else None,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_default_priority=int(Priority.NORMAL),
        task_track_started=True,
        task_send_sent_event=True,
        worker_send_task_events=True,
        broker_connection_retry_on_startup=True,
        broker_transport_options=dict(transport),
        result_backend_transport_options=dict(transport),
        visibility_timeout=timeout,
    )
    app.conf.update(celery_conf)
    app.visibility_timeout_is_explicit = bool(config.admission.visibility_timeout_s) or (
        "visibility_timeout" in (celery_conf.get("broker_transport_options") or {})
    )
    app.on_after_finalize.connect(_derive_visibility_timeout, weak=False)
    app.steps["consumer"].add("taskmesh.admission:AdmissionStep")
    _schedule_rebalance(app)
    return app


def _schedule_rebalance(app: TaskmeshCelery) -> None:
    """Register ``taskmesh.rebalance`` and run it on beat, at CRITICAL priority on gevent.

    ``expires`` drops a run that waited longer than one interval: the next one
    sees a fresher system anyway.
    """
    interval = app.taskmesh_config.rebalance.interval_s

    @app.task(name="taskmesh.rebalance", profile="io", shared=False, ignore_result=True, time_limit=60)
    def rebalance() -> dict[str, Any]:
        from .rebalance import rebalance as run

        return run(app)

    schedule = {
        "taskmesh-rebalance": {
            "task": "taskmesh.rebalance",
            "schedule": interval,
            "options": {"priority": int(Priority.CRITICAL), "expires": interval},
        }
    }
    app.conf.beat_schedule = {**schedule, **(app.conf.beat_schedule or {})}


def _derive_visibility_timeout(sender: TaskmeshCelery, **_: Any) -> None:
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



@signals.task_postrun.connect(weak=False)
def _empty_cuda_cache(**_: Any) -> None:
    """After each task, give PyTorch's cached GPU memory back so NVML shows it free.

    Admission trusts NVML's "free"; a cache kept by an idle pool process would
    otherwise look like memory in use and hold the next task back.
    """
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()

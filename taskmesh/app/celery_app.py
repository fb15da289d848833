"""``create_app``: a plain ``celery.Celery`` that knows what its tasks need.

Everything here is ordinary Celery configuration — queues, a router, a Task base
class, settings — so removing taskmesh leaves a working Celery app. Three methods of
Celery's app are extended:

- ``task()`` validates a resource declaration at import (Celery itself creates task
  classes lazily);
- ``_task_from_fun``, the one place Celery creates a task class — for ``@app.task``
  and for ``@shared_task`` alike — turns resource options into the task's
  ``requirement`` and puts ``TaskmeshTask`` behind a custom ``base=``;
- ``send_task``, which ``apply_async`` and every canvas end in, stamps the requirement,
  names the priority and runs the submit checks (``app.sending``), so a task sent by
  name is treated as one sent by ``.delay()``.

Defaults are those that long GPU tasks need and that Celery does not ship with:
late acks, reject on worker loss, prefetch multiplier 1, JSON only, task events on
(so Flower sees tasks without ``-E``), and a Redis visibility timeout derived from
the longest declared time limit (``app.visibility``). On a non-Redis broker (RabbitMQ),
taskmesh's state and the results live in the Redis that ``state=`` or
``TASKMESH_STATE_URL`` names (``state.client``).
"""

from __future__ import annotations

import logging
import os
from typing import Any

from celery import Celery
from celery.utils.imports import gen_task_name
from kombu import Exchange, Queue

from taskmesh.app.batching import batch_task_options
from taskmesh.app.beat import schedule_rebalance
from taskmesh.app.broker_errors import broker_errors
from taskmesh.app.cuda import connect_empty_cache
from taskmesh.app.dead_letters import connect_dead_letters
from taskmesh.app.models import declare_model
from taskmesh.app.sending import SENDING, prepare_send, requirement_by_name
from taskmesh.app.task import TaskmeshTask, with_taskmesh
from taskmesh.app.visibility import MIN_VISIBILITY_TIMEOUT, derive_visibility_timeout
from taskmesh.core.batching import BATCH_OPTIONS
from taskmesh.core.config import Config, load_config, unknown_task_overrides
from taskmesh.core.errors import ConfigError, RequirementError
from taskmesh.core.profiles import MAX_PRIORITY, QUEUES, Priority
from taskmesh.core.requirements import REQUIREMENT_OPTIONS, Requirement
from taskmesh.hardware.inventory import Inventory, detect
from taskmesh.state.client import STATE_ENV, STATE_URL, broker_is_redis, state_client

log = logging.getLogger(__name__)
DEFAULT_BROKER = "redis://127.0.0.1:6379/0"
BROKER_ENV = "TASKMESH_BROKER_URL"


class TaskmeshCelery(Celery):
    """``Celery`` whose ``task()`` accepts and validates resource options."""

    taskmesh_config: Config
    visibility_timeout_is_explicit: bool = False
    amqp_cls = "taskmesh.app.routing:TaskmeshAMQP"

    def task(self, *args: Any, **opts: Any) -> Any:
        if len(args) == 1 and callable(args[0]):
            return self.task(**opts)(args[0])
        resources = {k: opts.pop(k) for k in REQUIREMENT_OPTIONS if k in opts}
        batching = {k: opts.pop(k) for k in BATCH_OPTIONS if k in opts}

        def declare(fun: Any) -> Any:
            name = opts.get("name") or gen_task_name(self, fun.__name__, fun.__module__)
            requirement = self._requirement(name, {**resources, "priority": opts.pop("priority", None)})
            extra = batch_task_options(name, batching, requirement)
            return super(TaskmeshCelery, self).task(**dict(opts, requirement=requirement, **extra))(fun)

        return declare

    def model(self, name: str, vram: Any, load_s: float | None = None, never_evict: bool = False,
              unloader: Any = None) -> Any:
        """Declare a model over its loader (see ``app.models``); tasks name it with ``model=``."""
        return declare_model(self, name, vram, load_s=load_s, never_evict=never_evict, unloader=unloader)

    def _task_from_fun(self, fun: Any, name: str | None = None, base: Any = None, **options: Any) -> Any:
        name = name or self.gen_task_name(fun.__name__, fun.__module__)
        if "requirement" not in options:  # @shared_task, or Celery's own tasks: not validated by task()
            resources = {k: options.pop(k) for k in REQUIREMENT_OPTIONS if k in options}
            options["requirement"] = self._requirement(name, {**resources, "priority": options.pop("priority", None)})
            batching = {k: options.pop(k) for k in BATCH_OPTIONS if k in options}
            options.update(batch_task_options(name, batching, options["requirement"]))
        return super()._task_from_fun(fun, name=name, base=with_taskmesh(base or self.Task), **options)

    def send_task(self, name: str, args: Any = None, kwargs: Any = None, **options: Any) -> Any:
        # without task_type Celery looks the name up itself, for the task's execution options
        task = options.get("task_type") or self.registered(name)
        with broker_errors(self):  # taskmesh's checks, the result subscription and the publish alike
            prepare_send(self, name, task, args, kwargs, options)
            sending = SENDING.set(self)  # the publish signal's wake-up (sending.wake_idle_workers) is this app's
            try:
                return super().send_task(name, args, kwargs, **options)
            finally:
                SENDING.reset(sending)

    def registered(self, name: str | None) -> Any:
        """The task registered under *name* in this process, or ``None`` (finalizing the app
        first, as using a task does, unless it is not to be finalized automatically)."""
        registry = self.tasks if self.autofinalize or self.finalized else self._tasks
        return registry.get(name) if name else None

    def requirement_of(self, name: str, task: Any = None) -> Requirement | None:
        """What *name* needs, as this process knows it; ``None`` when it knows nothing of it."""
        return requirement_by_name(self, name, task if task is not None else self.registered(name))

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
            self._redis = state_client(self)
        return self._redis

    def broker_is_redis(self) -> bool:
        """Whether the broker is Redis (else RabbitMQ: priorities turned over, depth by passive declare)."""
        return broker_is_redis(self)

    def submit_policy(self) -> Any:
        """Checks done before a message is sent (backpressure, feasibility, fallback)."""
        if getattr(self, "_submit_policy", None) is None:
            from taskmesh.app.submit import SubmitPolicy

            self._submit_policy = SubmitPolicy(self)
        return self._submit_policy

    def inventory(self) -> Inventory:
        """This machine's hardware under this app's config (detected once, then cached)."""
        if getattr(self, "_inventory", None) is None:
            self._inventory = detect(self.taskmesh_config)
        return self._inventory


def warn_unknown_task_overrides(sender: Any, **_: Any) -> None:
    """A ``tasks:`` entry for a name this app does not register: one warning naming the file,
    the key and the closest task. A warning, not an error: Celery's ``on_after_finalize``
    swallows what its receivers raise, finalize can run in a producer before every task
    module is imported, and one hardware file may serve several apps."""
    app = sender
    for problem in unknown_task_overrides(app.taskmesh_config, app.tasks):
        log.warning("%s", problem)


def create_app(
    main: str | None = None,
    broker: str | None = None,
    hardware: str | os.PathLike[str] | None = None,
    state: str | None = None,
    **celery_conf: Any,
) -> TaskmeshCelery:
    """A Celery app with taskmesh's queues, router, task base and defaults.

    *broker*: the argument, else ``TASKMESH_BROKER_URL``, else ``taskmesh up``'s
    local Redis. *hardware*: a config path or name (see ``config.find_config_file``).
    *state*: the Redis of taskmesh's ledger and registry, else ``TASKMESH_STATE_URL``, else
    the broker's (a RabbitMQ broker needs one; it is the result backend too, unless given).
    Any other keyword is Celery configuration and wins over taskmesh's defaults;
    ``task_routes`` is merged instead: the user's routes first, then profile routing
    (``app.routing``).
    """
    config = load_config(hardware)
    broker_url = broker or os.environ.get(BROKER_ENV) or DEFAULT_BROKER
    state_url = state or os.environ.get(STATE_ENV) or None
    redis_results = broker_url if broker_url.startswith(("redis://", "rediss://")) else state_url
    # current, as Celery(...) makes it: @shared_task proxies resolve to the current app
    app = TaskmeshCelery(main, broker=broker_url, task_cls=TaskmeshTask)
    app.taskmesh_config = config
    timeout = config.admission.visibility_timeout_s or MIN_VISIBILITY_TIMEOUT
    transport = {"priority_steps": [0, 3, 6, 9], "visibility_timeout": timeout}
    # x-max-priority makes RabbitMQ order by priority (kombu's Redis transport ignores queue
    # arguments); every queue Celery creates later (need queues) gets it from task_queue_max_priority.
    priority_args = {"x-max-priority": MAX_PRIORITY}
    app.conf.update(
        task_queues=[Queue(q, Exchange(q, type="direct"), routing_key=q, queue_arguments=dict(priority_args))
                     for q in QUEUES],
        task_queue_max_priority=MAX_PRIORITY,
        task_default_queue=config.default_profile.queue,
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        result_accept_content=["json"],
        result_backend=redis_results if str(redis_results or "").startswith(("redis://", "rediss://")) else None,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_retry_on_worker_lost=True,  # a task that kills its process retries max_retries times, not for ever
        # one message per slot for every queue's workers. GPU and mixed: admission holds what does
        # not fit (admission.lookahead looks further). CPU: 4 per slot drained no-ops 1.43x faster
        # (BENCHMARKS.md, scenario 3), but a message then waits behind up to 3 more runs, past the
        # visibility timeout derived for one (app.visibility: it would run twice), and is admitted
        # on delivery, not when it starts. I/O (gevent, 100 slots): 4 measured no faster.
        worker_prefetch_multiplier=1,
        task_default_priority=int(Priority.NORMAL),
        task_track_started=True,
        task_send_sent_event=True,
        worker_send_task_events=True,
        broker_connection_retry_on_startup=True,
        broker_transport_options=dict(transport),
        result_backend_transport_options=dict(transport),
        visibility_timeout=timeout,
        **{STATE_URL: state_url},
    )
    app.conf.update(celery_conf)
    app.visibility_timeout_is_explicit = bool(config.admission.visibility_timeout_s) or (
        "visibility_timeout" in (celery_conf.get("broker_transport_options") or {})
    )
    app.on_after_finalize.connect(derive_visibility_timeout, weak=False)
    app.on_after_finalize.connect(warn_unknown_task_overrides, weak=False)
    app.steps["consumer"].add("taskmesh.worker.bootstep:AdmissionStep")
    app.steps["consumer"].add("taskmesh.worker.event_buffer:TaskEventBuffer")
    connect_empty_cache(app)
    connect_dead_letters(app)
    schedule_rebalance(app)
    return app

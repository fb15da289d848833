"""What every send does, however it is made: ``apply_async``, ``send_task`` by name, a
canvas step, a retry.

Celery's ``Task.apply_async`` ends in ``app.send_task``, and so does every canvas
(``Signature.apply_async`` → the task's ``apply_async``, or ``send_task`` for a task this
process does not know). ``TaskmeshCelery.send_task`` calls ``prepare_send`` here, so the
requirement header, the priority, the queue and the submit checks are the same for each.

*Strict or not.* A send the caller makes can be refused (``QueueFull``,
``InfeasibleRequirement``) with nothing sent. A send Celery makes on behalf of work already
accepted is never refused — it is logged and sent — since refusing it would break
Celery's semantics:

- the next step of a chain, a link callback, a chord's body, dispatched by a worker
  after the parent's body returned (``TaskmeshTask.__call__`` marks the request): a
  refusal there would fail a parent that succeeded;
- the members of a group after the first: a group is admitted or refused at its first
  member, so it is never partly sent;
- a retry (``retries`` > 0): Celery rejects a task whose retry cannot be sent, losing it.

A strict send that carries more of a canvas — ``chain`` (the steps after it), ``link``,
``chord`` (the body) — checks each of those signatures at the caller too, before the
first message is published.
"""

from __future__ import annotations

import contextvars
import time
from collections.abc import Iterator
from typing import Any

import redis
from celery import signals
from celery.canvas import maybe_signature

from taskmesh.app.routing import ROUTE_OPTION
from taskmesh.core.headers import ENQUEUED_AT, REQUIREMENT_HEADER
from taskmesh.core.profiles import Priority, amqp_priority
from taskmesh.core.requirements import Requirement
from taskmesh.state.client import broker_redis_url, state_redis_url
from taskmesh.state.fetch_wake import wake
from taskmesh.state.keys import layout

RETURNED = "taskmesh_returned"  # set on a worker request once its task body has returned or raised
CANVAS_OPTIONS = ("chain", "link", "chord")


def name_priority(options: dict[str, Any], declared: int | None) -> None:
    """``urgency=``, a ``Priority`` name, else the task's declared priority, into ``options["priority"]``."""
    urgency = options.pop("urgency", None)
    if urgency is not None:
        options["priority"] = int(Priority.from_urgency(urgency))
    elif options.get("priority") is not None:
        options["priority"] = Priority.parse(options["priority"])
    elif declared is not None:
        options["priority"] = declared


def prepare_send(app: Any, name: str, task: Any, args: Any, kwargs: Any, options: dict[str, Any]) -> None:
    """Stamp, route and check one send; raises before anything is published, or changes *options*."""
    requirement = app.requirement_of(name, task)
    name_priority(options, requirement.priority if requirement else None)
    if options.get("priority") is None:
        options["priority"] = app.conf.task_default_priority  # a name this process does not know
    headers = {**(options.get("headers") or {}), ENQUEUED_AT: time.time()}
    if requirement is not None:
        headers[REQUIREMENT_HEADER] = requirement.to_header()
    options["headers"] = headers
    if not app.broker_is_redis():  # RabbitMQ runs the highest number first; workers turn it back
        options["priority"] = amqp_priority(options["priority"])
    if requirement is None:
        return  # the worker, which has the task, finds its requirement there
    lenient = _lenient(app, options)
    policy = app.submit_policy()
    if lenient is None:
        for step in _canvas_steps(app, options):
            step_task = app.registered(step.task)
            step_requirement = app.requirement_of(step.task, step_task)
            if step_requirement is not None:
                step_options = dict(step.options)
                policy.check(step.task, step_requirement, step_options,
                             _routed(app, step.task, step_task, step.args, step.kwargs, step_options))
    route = app.amqp.router.lookup_route(options.get("route_name") or name, args, kwargs, dict(options), task)
    policy.prepare(name, requirement, options, _queue_of(app, route, options), lenient)
    if options.get("router") is None:  # Celery's router, whose answer this is
        options[ROUTE_OPTION] = (route,)


#: The taskmesh app whose ``send_task`` is publishing now (Celery's publish signal names no app).
SENDING: contextvars.ContextVar[Any] = contextvars.ContextVar("taskmesh_sending", default=None)


@signals.after_task_publish.connect
def wake_idle_workers(routing_key: str | None = None, **_: Any) -> None:
    """After each publish a taskmesh app makes to a Redis broker, wake the idle workers of its
    queue (``state.fetch_wake``), through taskmesh's client when its state is on the broker's
    Redis (else they wait their timeout); the message is sent already, so a failure here only
    leaves it to their next fetch. The wake list is named by the routing key, which is the
    queue's name unless a route names an exchange and another key (those wait the timeout)."""
    app = SENDING.get()
    broker = broker_redis_url(app) if app is not None else ""
    if routing_key and broker and state_redis_url(app) == broker:
        try:
            wake(app.redis(), routing_key, layout(app)["keyprefix"])
        except redis.RedisError:
            pass


def _lenient(app: Any, options: dict[str, Any]) -> str | None:
    """Why this send must not be refused, or ``None`` when it may be."""
    parent = app.current_worker_task
    if parent is not None and getattr(parent.request, RETURNED, False):
        return f"dispatched for {parent.name}[{parent.request.id}], which already finished"
    if options.get("group_index"):
        return f"a member of group {options.get('group_id')}, admitted at its first"
    if options.get("retries"):
        return f"retry {options['retries']} of {options.get('task_id')}, a task already accepted"
    return None


def _routed(app: Any, name: str, task: Any, args: Any, kwargs: Any, options: dict[str, Any]) -> str:
    """The queue Celery's router (user routes, then profile routing) will pick."""
    route = app.amqp.router.lookup_route(options.get("route_name") or name, args, kwargs, dict(options), task)
    return _queue_of(app, route, options)


def _queue_of(app: Any, route: Any, options: dict[str, Any]) -> str:
    """The queue a send goes to, given the route table's answer, as Celery's ``Router.route`` merges it."""
    queue = options.get("queue") or (route if isinstance(route, str) else (route or {}).get("queue"))
    queue = queue or app.conf.task_default_queue
    return queue if isinstance(queue, str) else queue.name


def _canvas_steps(app: Any, options: dict[str, Any]) -> Iterator[Any]:
    """Every task signature a send carries for later: the rest of a chain, callbacks, a chord body."""
    for key in CANVAS_OPTIONS:
        value = options.get(key)
        items = value if isinstance(value, list | tuple) else [value] if value else []
        for item in items:
            yield from _flatten(maybe_signature(item, app=app), app)


def _flatten(signature: Any, app: Any) -> Iterator[Any]:
    tasks = getattr(signature, "tasks", None)
    if tasks is None:
        yield signature
        return
    if isinstance(tasks, dict):  # a chord's header can be one group signature, not a list of them
        tasks = [tasks]
    for inner in tasks:
        yield from _flatten(maybe_signature(inner, app=app), app)
    body = getattr(signature, "body", None)
    if body is not None:
        yield from _flatten(maybe_signature(body, app=app), app)


def requirement_by_name(app: Any, name: str, task: Any) -> Requirement | None:
    """A registered task's requirement, else one from the config's ``tasks.<name>``; ``None``
    for a name this process knows nothing of."""
    requirement = getattr(task, "requirement", None)
    if requirement is not None:
        return requirement
    if name in app.taskmesh_config.tasks:
        return app._requirement(name, {})
    return None

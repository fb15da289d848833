"""Celery's message path, intercepted: a task ``Strategy`` that offers each message to the
admission controller before a ``Request`` exists, and a ``Request`` that tells it when
the run ends.

``admission_strategy`` (``TaskmeshTask.Strategy``) wraps Celery's default strategy:
admitted messages go on to it unchanged; the rest are *held*, still unacknowledged, so
a crash loses nothing. ``AdmittedRequest.acknowledge``/``reject`` (``TaskmeshTask.Request``)
release the reservation: every way a request ends — success, failure, retry, revoke,
time limit, worker loss — passes through one of the two, after Celery has marked the
request ready.

A message Celery schedules for later (an ETA or countdown, a rate limit) goes on to it
unadmitted, and ``admit_when_due`` offers its request when Celery hands it to the pool:
``Consumer.on_task_request``, which the ETA timer and the rate-limit bucket call. (A
``Request.execute_using_pool`` of ours would never be called: Celery's
``create_request_cls`` subclasses the Request and overrides it.)
"""

from __future__ import annotations

from typing import Any

from celery.worker import state as worker_state
from celery.worker.request import Request
from celery.worker.strategy import default as default_strategy
from kombu.transport import virtual

from taskmesh.core.headers import GPUS_HEADER, WARM_HEADER
from taskmesh.worker.rabbitmq import is_redis_channel, turn_priority
from taskmesh.worker.refusal import celery_header_problem, refuse

#: This worker process's controller and run-once guard (a worker process has one consumer); set by the bootstep.
current: Any = None
once_guard: Any = None


#: Ids of the micro-batches (``batching``) this worker has in flight: admitted as one task, under an id no request has.
batches_in_flight: set[str] = set()


def live_request_ids() -> set[str]:
    """Ids of the requests (and batches) this worker has reserved and not yet finished."""
    return {request.id for request in worker_state.reserved_requests} | batches_in_flight


def is_revoked(task_id: str) -> bool:
    return task_id in worker_state.revoked


class AdmittedRequest(Request):
    """A request that tells the admission controller when it is finished."""

    def acknowledge(self) -> None:
        super().acknowledge()
        if once_guard is not None:
            once_guard.ended(self.id, ran=True)
        _finished(self)

    def reject(self, requeue: bool = False) -> None:
        super().reject(requeue)
        if once_guard is not None:
            once_guard.ended(self.id, ran=not requeue)
        _finished(self)


def _finished(request: Request) -> None:
    # Early-acked tasks (acks_late=False) acknowledge at start while still reserved:
    # those are released by the controller's reconcile once Celery marks them ready.
    if current is not None and request not in worker_state.reserved_requests:
        current.finished(request.id)


def admission_strategy(task: Any, app: Any, consumer: Any, **kwargs: Any) -> Any:
    handler = default_strategy(task, app, consumer, **kwargs)
    once = bool(getattr(task, "once", False))

    def on_message(message: Any, body: Any, ack: Any, reject: Any, callbacks: Any, **kw: Any) -> Any:
        turn_priority(message)
        controller = getattr(consumer, "taskmesh_admission", None)
        if controller is None:
            return handler(message, body, ack, reject, callbacks, **kw)
        problem = celery_header_problem(message.headers)
        if problem is not None:
            controller.counters["refused"] += 1
            return refuse(consumer, controller.registry.client, message, problem)
        if message.headers.get("eta") or _rate_limited(task, consumer):
            controller.defer(message)
            return handler(message, body, ack, reject, callbacks, **kw)

        def proceed() -> Any:
            return handler(message, body, ack, reject, callbacks, **kw)

        def give_back(restore: bool = True) -> None:
            requeue_at_front(message, restore)

        if once and once_guard is not None:
            return once_guard.offer(message, proceed, give_back)
        return controller.offer(message, proceed, give_back)

    return on_message


def _rate_limited(task: Any, consumer: Any) -> bool:
    """Celery passes the task through its token bucket (the ``rate_limit`` control command may add one)."""
    return not consumer.disable_rate_limits and consumer.task_buckets[task.name] is not None


def admit_when_due(consumer: Any, controller: Any) -> None:
    """Route Celery's hand-over of requests to the pool through *controller* (deferred ones only)."""
    hand_over = consumer.on_task_request

    def on_task_request(request: Request) -> None:
        def start() -> None:
            for header in (GPUS_HEADER, WARM_HEADER):  # the request copied the headers on arrival, before admission
                if request.message.headers.get(header) is not None:
                    request.request_dict[header] = request.message.headers[header]
            hand_over(request)

        if not controller.due(request.message, start, lambda restore=True: _give_back(request, restore)):
            hand_over(request)

    consumer.on_task_request = on_task_request


def requeue_at_front(message: Any, restore: bool = True) -> None:
    """Put a held *message* back where it was taken from, the front of its queue.

    ``reject(requeue=True)`` LPUSHes it behind everything waiting; kombu's own restore
    (as at a worker's shutdown) moves it from ``unacked`` to the front in one
    transaction (already done when *restore* is false: ``recovery.put_back_line``).
    What is left is the channel's own record of it, cleared as kombu's own requeue
    clears it, without Redis: the copy put back keeps its delivery tag, so an ack sent
    now would delete the ``unacked`` entry of that copy if a worker (this one, whose
    BRPOP may be waiting on the queue) has taken it already — and a crash of that
    worker would then lose it. RabbitMQ
    has no such restore: a requeueing reject puts it back at its place (``rabbitmq``).
    """
    if not is_redis_channel(message.channel):
        message.reject(requeue=True)
        return
    if restore:
        message.channel.qos.restore_by_tag(message.delivery_tag, leftmost=False)
    virtual.QoS.ack(message.channel.qos, message.delivery_tag)
    message._state = "ACK"


def _give_back(request: Request, restore: bool = True) -> None:
    """Requeue a held request Celery counts as reserved, and forget it as Celery would."""
    requeue_at_front(request.message, restore)
    request.acknowledged = True
    worker_state.task_ready(request)

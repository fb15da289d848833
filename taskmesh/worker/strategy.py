"""Celery's message path, intercepted: a task ``Strategy`` that offers each message to the
admission controller before a ``Request`` exists, and a ``Request`` that tells it when
the run ends.

``admission_strategy`` (``TaskmeshTask.Strategy``) wraps Celery's default strategy:
admitted messages go on to it unchanged; the rest are *held*, still unacknowledged, so
a crash loses nothing. ``AdmittedRequest.acknowledge``/``reject`` (``TaskmeshTask.Request``)
release the reservation: every way a request ends — success, failure, retry, revoke,
time limit, worker loss — passes through one of the two, after Celery has marked the
request ready.
"""

from __future__ import annotations

from typing import Any

from celery.worker import state as worker_state
from celery.worker.request import Request
from celery.worker.strategy import default as default_strategy

#: This worker process's controller and run-once guard (a worker process has one consumer); set by the bootstep.
current: Any = None
once_guard: Any = None


def live_request_ids() -> set[str]:
    """Ids of the requests this worker has reserved and not yet finished."""
    return {request.id for request in worker_state.reserved_requests}


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
        controller = getattr(consumer, "taskmesh_admission", None)
        if controller is None:
            return handler(message, body, ack, reject, callbacks, **kw)
        def proceed() -> Any:
            return handler(message, body, ack, reject, callbacks, **kw)

        if once and once_guard is not None:
            return once_guard.offer(message, proceed)
        return controller.offer(message, proceed)

    return on_message

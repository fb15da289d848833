"""Remote-control commands that taskmesh adds to Celery's (``celery inspect``/``control``):
``taskmesh_assist`` and ``taskmesh_resize``, which the rebalancer broadcasts.

They go through the admission controller rather than bare ``add_consumer``/
``pool_grow``, so that a queue added while intake is paused stays paused and a resize
is timestamped for the thread-budget audit. Registered when this module is imported
(the bootstep does).
"""

from __future__ import annotations

import time
from typing import Any

from celery.worker.control import control_command

from taskmesh.core.control_args import assist_problem, resize_problem
from taskmesh.core.need_queues import family
from taskmesh.core.profiles import Profile
from taskmesh.core.rebalance_policy import gevent_ceiling
from taskmesh.worker.controller import AdmissionController


def resize(controller: AdmissionController, delta: int) -> int:
    """Grow or shrink the pool by *delta* (remote control thread); returns the new size."""
    consumer = controller.consumer
    pool = consumer.pool
    if delta > 0:
        pool.grow(delta)
    elif delta < 0:
        pool.shrink(-delta)
    consumer._update_prefetch_count(delta)
    size = pool.num_processes
    controller.pool_history.append((time.time(), size))
    del controller.pool_history[:-20]
    controller.changed.set()
    return size


def pool_ceiling(consumer: Any, controller: AdmissionController) -> int:
    """The most processes this worker's pool may have: the host's CPU threads for a process
    pool (as the rebalancer shares them), the configured growth limit for gevent."""
    if consumer.pool.__class__.__module__.startswith("celery.concurrency.gevent"):
        return gevent_ceiling(controller.gate.config)
    return max(1, controller.gate.cpu_threads)


@control_command(args=[("queue", str)], signature="[QUEUE]")
def taskmesh_assist(state: Any, queue: str | None = None, **_: Any) -> dict[str, str]:
    """Serve *queue* besides the worker's own queues (none: stop assisting)."""
    controller = getattr(state.consumer, "taskmesh_admission", None)
    if controller is None:
        return {"error": "this worker has no taskmesh admission step"}
    problem = assist_problem(queue, set(state.consumer.app.amqp.queues))
    if problem:
        return {"error": problem}
    if queue and controller.no_gpu is not None and family(queue) == Profile.GPU_INTENSIVE.queue:
        return {"error": f"this worker sees no GPU ({controller.no_gpu}); it serves no GPU queue"}
    state.consumer.call_soon(controller.intake.set_assist, queue or None)
    return {"ok": f"assisting {queue or 'nothing'}"}


@control_command(args=[("n", int)], signature="N")
def taskmesh_resize(state: Any, n: int = 0, **_: Any) -> dict[str, str]:
    """Grow (n > 0) or shrink (n < 0) the pool, as ``pool_grow``/``pool_shrink`` do,
    and record the change with its time so the thread budget can be audited."""
    controller = getattr(state.consumer, "taskmesh_admission", None)
    if controller is None:
        return {"error": "this worker has no taskmesh admission step"}
    if state.consumer.controller.autoscaler:
        return {"error": "the pool is autoscaled; adjust --autoscale instead"}
    problem = resize_problem(n, state.consumer.pool.num_processes, pool_ceiling(state.consumer, controller))
    if problem:
        return {"error": problem}
    try:
        size = resize(controller, n)
    except ValueError as exc:  # billiard: cannot shrink busy processes
        return {"error": str(exc)}
    return {"ok": f"pool size {size}"}

"""The admission step: a Celery consumer bootstep that holds a GPU task until its
memory is really there, and pauses the worker's intake meanwhile.

Where it hooks in, and why there:

* ``admission_strategy`` (``TaskmeshTask.Strategy``) sees each message before a
  ``Request`` exists. Admitted messages go on to Celery's default strategy
  unchanged; the rest are *held* — still unacknowledged, so a crash loses nothing —
  and the worker stops consuming (``cancel_task_queue``) until the head of the line
  fits (``add_task_queue``). No requeue loop, no message run twice.
* ``AdmittedRequest.acknowledge``/``reject`` (``TaskmeshTask.Request``) release the
  reservation: every way a request ends — success, failure, retry, revoke, time
  limit, worker loss — passes through one of the two, after Celery has marked the
  request ready. A timer reconciles anything that ends otherwise.
* A heartbeat thread, not the event loop, announces the worker in the registry and
  refreshes its reservations, so a ``solo`` worker busy with a long task is not
  mistaken for a dead one. It also gives back the messages of workers that died,
  through kombu's own ``restore_by_tag``.

State goes to ``celery inspect stats`` (``info``: the full state under ``taskmesh``
and a plain line per GPU under ``taskmesh_gpus``, which Flower's worker page shows in
its "Other" tab) and to ``worker-taskmesh`` events, which Celery sends without ``-E``
because of the ``worker-`` prefix.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import uuid
from typing import Any

import redis
from celery import bootsteps
from celery.worker import state as worker_state
from celery.worker.control import control_command
from celery.worker.request import Request
from celery.worker.strategy import default as default_strategy

from .activity import gpu_summary
from .controller import AdmissionController
from .gate import Gate
from .gpu import provider_from_env
from .hardware import detect
from .ledger import Ledger
from .registry import Registry

log = logging.getLogger(__name__)
TICK_S = 0.5
HEARTBEAT_S = 2.0
MIN_BEAT_S = 1.0


class AdmittedRequest(Request):
    """A request that tells the admission controller when it is finished."""

    def acknowledge(self) -> None:
        super().acknowledge()
        _finished(self)

    def reject(self, requeue: bool = False) -> None:
        super().reject(requeue)
        _finished(self)


def _finished(request: Request) -> None:
    # Early-acked tasks (acks_late=False) acknowledge at start while still reserved:
    # those are released by the controller's reconcile once Celery marks them ready.
    controller = _current
    if controller is not None and request not in worker_state.reserved_requests:
        controller.finished(request.id)


#: This worker process's controller (a worker process has one consumer).
_current: AdmissionController | None = None


def admission_strategy(task: Any, app: Any, consumer: Any, **kwargs: Any) -> Any:
    handler = default_strategy(task, app, consumer, **kwargs)

    def on_message(message: Any, body: Any, ack: Any, reject: Any, callbacks: Any, **kw: Any) -> Any:
        controller = getattr(consumer, "taskmesh_admission", None)
        if controller is None:
            return handler(message, body, ack, reject, callbacks, **kw)
        return controller.offer(message, lambda: handler(message, body, ack, reject, callbacks, **kw))

    return on_message


def _visible_gpu_uuids(provider: Any) -> tuple[str, ...] | None:
    value = os.environ.get("CUDA_VISIBLE_DEVICES")
    if value is None:
        return None
    entries = [e.strip() for e in value.split(",") if e.strip()]
    gpus = provider.snapshot()
    return tuple(gpus[int(e)].uuid if e.isdigit() and int(e) < len(gpus) else e for e in entries)


class AdmissionStep(bootsteps.StartStopStep):
    """Registered on every app by ``create_app``; a plain ``celery worker`` gets it too."""

    requires = ("celery.worker.consumer.tasks:Tasks",)
    label = "taskmesh admission"

    def __init__(self, c: Any, **kwargs: Any) -> None:
        super().__init__(c, **kwargs)
        self.controller: AdmissionController | None = None
        self.timer_entry: Any = None
        self.heartbeat: threading.Thread | None = None
        self.stopping = threading.Event()
        c.taskmesh_admission = None

    def _create(self, c: Any) -> AdmissionController | None:
        app = c.app
        url = app.conf.broker_url or ""
        if not url.startswith(("redis://", "rediss://", "unix://")):
            log.warning("taskmesh admission needs a Redis broker; %s is not one, so tasks are not admitted", url)
            return None
        config = app.taskmesh_config
        client = redis.Redis.from_url(url)
        ttl = config.admission.reservation_ttl_s
        provider = provider_from_env(config.simulate_gpus, control=client)
        inventory = detect(config, provider)
        gate = Gate(
            host=socket.gethostname(),
            provider=provider,
            ledger=Ledger(client, ttl_s=ttl),
            config=config.admission,
            gpu_uuids=_visible_gpu_uuids(provider),
            cpu_threads=inventory.cpu_threads,
            memory_total_mib=inventory.memory_total_mib,
        )
        registry = Registry(client, alive_s=ttl, memory_s=config.admission.registry_memory_s)
        return AdmissionController(c, gate, registry, incarnation=uuid.uuid4().hex)

    def start(self, c: Any) -> None:
        if self.controller is None:
            self.controller = self._create(c)
            if self.controller is None:
                return
            global _current
            _current = self.controller
            self.heartbeat = threading.Thread(target=self._beat, name="taskmesh-heartbeat", daemon=True)
            self.heartbeat.start()
        c.taskmesh_admission = self.controller
        self.controller.check()  # a sick GPU or a host under pressure takes nothing, from the start
        self.timer_entry = c.timer.call_repeatedly(TICK_S, self.controller.tick)

    def _beat(self) -> None:
        """Announce every HEARTBEAT_S, and soon (coalesced) after the held messages change."""
        controller = self.controller
        while not self.stopping.is_set():
            try:
                controller.heartbeat()
            except Exception:  # the next beat tries again; a dead Redis must not kill the thread
                log.exception("taskmesh heartbeat failed")
            controller.changed.wait(HEARTBEAT_S)
            controller.changed.clear()
            self.stopping.wait(MIN_BEAT_S)

    def stop(self, c: Any) -> None:
        if self.timer_entry is not None:
            self.timer_entry.cancel()
            self.timer_entry = None

    def shutdown(self, c: Any) -> None:
        self.stop(c)
        self.stopping.set()
        if self.controller is not None:
            self.controller.shutdown()
            global _current
            _current = None

    def info(self, c: Any) -> dict[str, Any]:
        """``inspect stats``: the readable GPU line first (Flower's "Other" tab), then the full state."""
        controller = getattr(c, "taskmesh_admission", None)
        if controller is None:
            return {}
        state = controller.state()
        return {"taskmesh_gpus": gpu_summary(state), "taskmesh": state} if state["gpus"] else {"taskmesh": state}


def reclaim_dead_workers(app: Any, registry: Registry, client: redis.Redis) -> int:
    """Give back the messages of workers that died holding them; returns how many."""
    dead = registry.dead_holding_messages()
    if not dead or not client.set("taskmesh:janitor", socket.gethostname(), nx=True, ex=10):
        return 0
    restored = 0
    try:
        with app.connection_for_write() as conn:
            channel = conn.default_channel
            for key, tags in dead.items():
                for tag in tags:
                    if channel.client.hexists(channel.unacked_key, tag):
                        channel.qos.restore_by_tag(tag, client=channel.client, leftmost=False)
                        restored += 1
                registry.forget_inflight(key)
                log.warning("worker %s died holding %d message(s); delivered them again", key, len(tags))
    finally:
        client.delete("taskmesh:janitor")
    return restored


@control_command(args=[("queue", str)], signature="[QUEUE]")
def taskmesh_assist(state: Any, queue: str | None = None, **_: Any) -> dict[str, str]:
    """Serve *queue* besides the worker's own queues (none: stop assisting).

    The rebalancer's way to move a mixed worker's consumer. It goes through the
    admission controller rather than bare ``add_consumer``/``cancel_consumer``
    so that a queue added while admission has paused intake stays paused.
    """
    controller = getattr(state.consumer, "taskmesh_admission", None)
    if controller is None:
        return {"error": "this worker has no taskmesh admission step"}
    state.consumer.call_soon(controller.set_assist, queue or None)
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
    try:
        size = controller.resize(int(n))
    except ValueError as exc:  # billiard: cannot shrink busy processes
        return {"error": str(exc)}
    return {"ok": f"pool size {size}"}

"""Micro-batching in the worker: the ``Strategy`` of a task declared with ``batch_size``.

Celery's default strategy makes one ``Request`` per message and hands it to the pool;
this one makes the same ``Request`` (so revokes, expiry, ``task-received`` events and
``inspect reserved`` behave as for any task) and buffers it, unacknowledged, in the
consumer's process. The buffer is flushed into one pool job when it holds
``batch_size`` items, when ``batch_wait`` has passed since its first item, or at once
when a CRITICAL item arrives. A flushed batch is offered to the admission controller as
one task: its requirement is the task's, with ``vram_per_item`` × items added, and no
more items than the largest GPU here can hold. ``batch_run`` runs it and ends each
item's request.

Prefetch: the messages a batcher holds raise the consumer's prefetch (``QoS.increment_eventually``,
as Celery does for ETA tasks) so that a batch in flight holds one prefetch slot however
many items it has, and buffered or scheduled items hold none; while a batch is in flight
one slot more lets the next batch fill as it runs, until it is full. At most one batch
per pool process is in flight: a full buffer waits for one to end, so an item revoked
meanwhile is still left out.

Nothing is lost: every item's delivery tag is in the controller's ``tags`` from
arrival (announced to the registry at once, so a killed worker's items are given back by
recovery), and each message is acknowledged only after its item's result is stored. A
buffer left from before a broker reconnect (a new ``QoS``) is dropped: kombu put those
messages back as the old channel closed. An item with a countdown or ETA joins the
buffer when it comes due; one revoked while buffered is marked revoked at the flush.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from typing import Any

from celery import signals
from celery.utils.imports import symbol_by_name
from celery.utils.time import timezone
from celery.worker import state as worker_state
from celery.worker.request import create_request_cls
from celery.worker.strategy import hybrid_to_proto2, proto1_to_proto2
from kombu.asynchronous.timer import to_timestamp
from kombu.utils.uuid import uuid

from taskmesh.core.gate import Reroute
from taskmesh.core.headers import GPUS_HEADER, REQUIREMENT_HEADER, WARM_HEADER
from taskmesh.core.need_queues import fits, need_queue
from taskmesh.core.profiles import Priority, Profile
from taskmesh.worker.batch_run import BatchOutcome, ItemFailure, run_batch
from taskmesh.worker.gpu_queues import reroute
from taskmesh.worker.rabbitmq import turn_priority
from taskmesh.worker.refusal import refuse, requirement_of
from taskmesh.worker.strategy import batches_in_flight, requeue_at_front

log = logging.getLogger(__name__)


@dataclasses.dataclass
class BatchEnvelope:
    """What the admission controller reads of a message, for a whole batch: one id, one requirement."""

    headers: dict[str, Any]
    delivery_tag: str
    delivery_info: dict[str, Any]

    def decode(self) -> list[Any]:
        return [[], {}, {}]


def batch_strategy(task: Any, app: Any, consumer: Any, **kwargs: Any) -> Any:
    """``Task.Strategy`` of batch tasks: Celery builds it per task at every consumer start."""
    return Batcher(task, app, consumer).on_message


class Batcher:
    def __init__(self, task: Any, app: Any, consumer: Any) -> None:
        self.task, self.app, self.consumer = task, app, consumer
        self.batching = task.batching
        self.size = task.batching.size or 1
        self.qos: Any = None  # the consumer's, from the first message; after a reconnect it has a new one
        self.Req = create_request_cls(symbol_by_name(task.Request), task, consumer.pool, consumer.hostname,
                                      consumer.event_dispatcher, app=app)
        self.revoked = consumer.controller.state.revoked
        self.buffer: list[Any] = []
        self.arrived: dict[str, float] = {}  # task id → when it joined the buffer (the fill wait)
        self.scheduled = 0  # items with an ETA not yet due
        self.batches: dict[str, int] = {}  # in flight (held for admission or on the pool): id → items
        self.lifted = 0  # what this batcher added to the consumer's prefetch
        self.flush_wanted = False  # a flush came due while every pool process had a batch
        self.timer: Any = None
        self.lock = threading.Lock()

    # --- arrival ----------------------------------------------------------------------

    def on_message(self, message: Any, body: Any, ack: Any, reject: Any, callbacks: Any, **kw: Any) -> None:
        turn_priority(message)
        controller = getattr(self.consumer, "taskmesh_admission", None)
        if controller is not None:
            try:
                requirement_of(message)
            except Exception as exc:
                refuse(self.consumer, controller.registry.client, message, exc)
                controller.counters["refused"] += 1
                return
        if self.qos is None:  # Celery builds strategies before the consumer's QoS
            self.qos = self.consumer.qos
        req = self._request(message, body, ack, reject)
        if (req.expires or req.id in self.revoked) and req.revoked():
            return
        signals.task_received.send(sender=self.consumer, request=req)
        req.send_event("task-received", name=req.name, args=req.argsrepr, kwargs=req.kwargsrepr,
                       root_id=req.root_id, parent_id=req.parent_id, retries=req.request_dict.get("retries", 0),
                       eta=req.eta and req.eta.isoformat(), expires=req.expires and req.expires.isoformat())
        if controller is not None:
            controller.arrived(message)
        if req.eta:
            eta = to_timestamp(timezone.to_system(req.eta)) if req.utc else to_timestamp(req.eta, self.app.timezone)
            self.scheduled += 1
            self._settle()
            self.consumer.timer.call_at(eta, self._due, (req,), priority=6)
        else:
            self._add(req)

    def _request(self, message: Any, body: Any, ack: Any, reject: Any) -> Any:
        if body is None and "args" not in message.payload:
            body, headers, decoded, utc = message.body, message.headers, False, self.app.uses_utc_timezone()
        elif "args" in message.payload:
            body, headers, decoded, utc = hybrid_to_proto2(message, message.payload)
        else:
            body, headers, decoded, utc = proto1_to_proto2(message, body)
        return self.Req(message, on_ack=ack, on_reject=reject, app=self.app, hostname=self.consumer.hostname,
                        eventer=self.consumer.event_dispatcher, task=self.task,
                        connection_errors=self.consumer.connection_errors,
                        body=body, headers=headers, decoded=decoded, utc=utc)

    def _due(self, req: Any) -> None:
        if self.consumer.qos is not self.qos:
            return  # the consumer reconnected; kombu restored this message
        self.scheduled -= 1
        if req.revoked():
            self._settle()
            return
        self._add(req)

    def _add(self, req: Any) -> None:
        worker_state.task_reserved(req)
        self.buffer.append(req)
        self.arrived[req.id] = time.monotonic()
        priority = req.delivery_info.get("priority")
        if len(self.buffer) >= self.size or (priority is not None and priority <= Priority.CRITICAL):
            self.flush()
            return
        self._settle()
        if self.timer is None:
            self.timer = self.consumer.timer.call_after(self.batching.wait_s, self.flush)

    def _settle(self) -> None:
        """Set this batcher's share of the consumer's prefetch from what it holds (see the module)."""
        with self.lock:
            ahead = 1 if self.batches and len(self.buffer) < self.size else 0
            want = self.scheduled + len(self.buffer) + sum(n - 1 for n in self.batches.values()) + ahead
            change, self.lifted = want - self.lifted, want
        if change > 0:
            self.qos.increment_eventually(change)
        elif change < 0:
            self.qos.decrement_eventually(-change)

    # --- flush ------------------------------------------------------------------------

    def flush(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.consumer.qos is not self.qos:  # reconnected: kombu put these messages back
            self.buffer.clear()
            self.arrived.clear()
            return
        pool = self.consumer.pool
        if len(self.batches) >= (getattr(pool, "num_processes", None) or pool.limit or 1):
            self.flush_wanted = True  # when a batch ends
            self._settle()
            return
        self.flush_wanted = False
        live, now = [], time.monotonic()
        fill_s = now - min((self.arrived.pop(r.id, now) for r in self.buffer[:self.size]), default=now)
        for req in self.buffer[:self.size]:
            if req.revoked():
                continue
            if len(req.args or ()) != 1 or req.kwargs:
                req.on_failure(ItemFailure(TypeError(f"{self.task.name} batches its calls: send one item per call "
                                                     f"(.delay(item)), not args={req.args!r} kwargs={req.kwargs!r}")))
            else:
                live.append(req)
        self.buffer = self.buffer[self.size:]
        controller = getattr(self.consumer, "taskmesh_admission", None)
        handed = self._hand_over(controller, live)
        if handed is not None:  # its model is warm on another worker: each item goes to it, not to a load here
            self._reroute(controller, live, handed)
            live = []
        while live:
            count = self._items_that_fit(controller, len(live))
            if count is None:
                self._reroute(controller, live)
                break
            self._offer(controller, live[:count], fill_s)
            live = live[count:]
        self._settle()
        if self.buffer and self.timer is None:
            self.timer = self.consumer.timer.call_after(self.batching.wait_s, self.flush)

    def _after_batch(self, batch_id: str) -> None:
        with self.lock:
            self.batches.pop(batch_id, None)
        batches_in_flight.discard(batch_id)
        self._settle()
        if self.buffer and (self.flush_wanted or len(self.buffer) >= self.size):
            self.consumer.call_soon(self.flush)

    def _items_that_fit(self, controller: Any, count: int) -> int | None:
        """How many of *count* items one batch may take here; ``None``: no GPU here can run even one."""
        base = self.task.requirement
        if controller is None or not base.needs_gpu or base.profile is Profile.MIXED:
            return count
        margin = controller.gate.config.safety_margin_mib
        one = self.batching.requirement(base, 1)
        sizes = [g.memory_total_mib - margin for g in controller.gate.gpus() if fits(g, one, margin)]
        return min(count, self.batching.items_that_fit(base, max(sizes))) if sizes else None

    def _hand_over(self, controller: Any, requests: list[Any]) -> Reroute | None:
        """Items taken from the profile queue for a model warm elsewhere and not here go to its
        queue one by one, as single tasks do (``model_queues.hand_over``): a batch envelope
        stands for many messages and cannot be published on itself."""
        base = self.task.requirement
        if controller is None or not requests or base.model is None or controller.warm.warm_here(base.model):
            return None
        return controller.model_queues.hand_over(base, (requests[0].message.delivery_info or {}).get("routing_key"))

    def _reroute(self, controller: Any, requests: list[Any], decision: Reroute | None = None) -> None:
        base = self.task.requirement
        decision = decision or (Reroute(Profile.GPU_INTENSIVE.queue, "this worker sees no GPU")
                                if not controller.gate.known else Reroute(need_queue(base)))
        for req in requests:
            reroute(controller, req.message, decision, base)
            req.acknowledged = True
            worker_state.task_ready(req)

    def _offer(self, controller: Any, requests: list[Any], fill_s: float) -> None:
        batch_id = f"batch-{uuid()}"
        with self.lock:
            self.batches[batch_id] = len(requests)
        batches_in_flight.add(batch_id)  # its reservation is live while no request has its id
        requirement = self.batching.requirement(self.task.requirement, len(requests))
        first = requests[0].message
        envelope = BatchEnvelope(
            headers={**{k: v for k, v in first.headers.items() if k not in (GPUS_HEADER, WARM_HEADER)},
                     "id": batch_id, "eta": None, "expires": None,
                     REQUIREMENT_HEADER: requirement.to_header()},
            delivery_tag=str(first.delivery_tag), delivery_info=first.delivery_info or {})
        if controller is None:
            self._dispatch(controller, batch_id, requests, envelope, fill_s)
            return
        controller.offer(envelope, lambda: self._dispatch(controller, batch_id, requests, envelope, fill_s),
                         lambda: self._give_back(controller, batch_id, requests))

    def _dispatch(self, controller: Any, batch_id: str, requests: list[Any], envelope: BatchEnvelope,
                  fill_s: float) -> None:
        """Admitted: one pool job for the batch."""
        def ended() -> None:
            if controller is not None:
                controller.finished(batch_id)
            self._after_batch(batch_id)

        outcome = BatchOutcome(requests, ended)
        # with the body's embed (callbacks, errbacks, chain, chord), as Celery's own execution has it
        items = [(r.id, r.args[0], {**r.request_dict, **(r._payload[2] or {})}) for r in requests]
        self.consumer.pool.apply_async(
            run_batch, args=(self.task.name, batch_id, items,
                             {h: envelope.headers[h] for h in (GPUS_HEADER, WARM_HEADER) if h in envelope.headers},
                             fill_s),
            accept_callback=outcome.accepted, callback=outcome.returned, error_callback=outcome.failed,
            soft_timeout=self.task.soft_time_limit, timeout=self.task.time_limit, correlation_id=batch_id)

    def _give_back(self, controller: Any, batch_id: str, requests: list[Any]) -> None:
        """A held batch goes back to the front of its queue (last item first, so the order is kept)."""
        for req in reversed(requests):
            requeue_at_front(req.message)
            req.acknowledged = True
            worker_state.task_ready(req)
            with controller.lock:
                controller.tags.pop(req.id, None)
        self._after_batch(batch_id)

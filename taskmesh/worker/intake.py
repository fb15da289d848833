"""Pausing and resuming a worker's intake, with Celery's documented consumer methods.

While the held line takes no more messages (``LinePolicy.takes_more``: the window
behind the head is full, its head has waited past ``admission.max_head_wait_s``, the
rule is ``strict``), or the GPUs are unhealthy, or the host is under pressure, the
worker stops consuming every queue
(``cancel_task_queue``) and starts again when nothing holds it back
(``add_task_queue``); nothing is requeued in a loop and nothing runs twice. While an
exclusive batch runs, it consumes that batch's queue alone (``only``, ``restore``). Queues
added meanwhile — the rebalancer's assist queue, a need queue this worker's GPUs can
serve — join the paused set, so a pause is never undone by the side door.

A held message is delivered and unacknowledged, so it fills one of the worker's
prefetch slots: to see the messages behind it (and backfill them into free pool
slots), the prefetch count grows by one per held message and shrinks as they leave,
through ``consumer.qos`` as Celery does for ETA tasks (``increment_eventually``,
applied by the consumer's loop).
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger(__name__)


class Intake:
    def __init__(self, consumer: Any) -> None:
        self.consumer = consumer
        self.paused_queues: list[str] = []
        self.assist: str | None = None  # the extra queue the rebalancer asked this worker to serve
        self.extra_prefetch = 0  # prefetch slots added for held messages, on the QoS object below
        self.qos: Any = None
        self.set_aside: list[str] | None = None  # while one queue is consumed alone: the others, to restore

    @property
    def paused(self) -> bool:
        return bool(self.paused_queues)

    def consumed(self) -> tuple[str, ...]:
        """Every queue this worker takes from when not paused."""
        consumer = self.consumer.task_consumer
        queues = tuple(q.name for q in consumer.queues) if consumer else ()
        return tuple(sorted(set(queues) | set(self.paused_queues) | set(self.set_aside or ())))

    def update(self, should_pause: bool, why: Any) -> bool:
        """Pause or resume as *should_pause* says; ``True`` when this call paused."""
        if should_pause and not self.paused_queues:
            self.paused_queues = [q.name for q in self.consumer.task_consumer.queues]
            if not self.paused_queues:  # it consumes nothing: nothing to pause
                return False
            for queue in self.paused_queues:
                self.consumer.cancel_task_queue(queue)
            log.info("paused intake of %s: %s", self.paused_queues, why)
            return True
        if not should_pause and self.paused_queues:
            queues, self.paused_queues = self.paused_queues, []
            for queue in queues:
                self.consumer.add_task_queue(queue)
            log.info("resumed intake of %s", queues)
        return False

    def hold_slots(self, held: int) -> None:
        """Keep the prefetch count at the pool's slots plus *held* (the held messages)."""
        qos = self.consumer.qos
        if qos is not self.qos:  # a new connection starts a new QoS at the initial count, holding nothing
            self.qos, self.extra_prefetch = qos, 0
        if qos is None or held == self.extra_prefetch:
            return
        if held > self.extra_prefetch:
            qos.increment_eventually(held - self.extra_prefetch)
        else:
            qos.decrement_eventually(self.extra_prefetch - held)
        self.extra_prefetch = held

    def only(self, queue: str) -> None:
        """Consume *queue* alone (an exclusive batch) until ``restore``; a pause in force covers it."""
        others = [q for q in self.consumed() if q != queue]
        for name in others:
            if name not in self.paused_queues:
                self.consumer.cancel_task_queue(name)
        self.set_aside = others
        if self.paused_queues:
            self.paused_queues = [queue]
        else:
            self.consumer.add_task_queue(queue)
        log.info("consuming %s alone (set aside: %s)", queue, others)

    def restore(self) -> None:
        """Consume again what ``only`` set aside, honouring a pause."""
        others, self.set_aside = self.set_aside or [], None
        for name in others:
            self.add(name)
        log.info("consuming %s again", others)

    def add(self, queue: str) -> None:
        """Consume *queue* too, honouring a pause (and a queue consumed alone)."""
        if self.set_aside is not None:
            self.set_aside.append(queue)
        elif self.paused_queues:
            self.paused_queues.append(queue)
        else:
            self.consumer.add_task_queue(queue)

    def drop(self, queue: str) -> None:
        """Stop consuming *queue* for good, paused or not (a GPU queue on a worker that sees no GPU)."""
        if self.assist == queue:
            self.assist = None
        if self.set_aside is not None and queue in self.set_aside:
            self.set_aside.remove(queue)
        elif queue in self.paused_queues:
            self.paused_queues.remove(queue)
        else:
            self.consumer.cancel_task_queue(queue)

    def set_assist(self, queue: str | None) -> None:
        """Serve *queue* besides this worker's own (``None``: only its own), honouring a pause."""
        old, self.assist = self.assist, queue
        if old == queue:
            return
        if self.paused_queues:
            self.paused_queues = [q for q in self.paused_queues if q != old] + ([queue] if queue else [])
            return
        if old:
            self.consumer.cancel_task_queue(old)
        if queue:
            self.consumer.add_task_queue(queue)
        log.info("rebalancer: now also serving %s (was %s)", queue, old)

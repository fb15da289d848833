"""Giving held messages back unrun, so that this worker's hold never costs a message or a run.

A held message is unacknowledged here: no other worker can run it while this one holds
it, and Redis delivers it again once its visibility timeout passes, counting from
delivery. So the controller gives its held line back to the front of its queues, in line
order (``put_back_line``: the head keeps its turn), when holding on would cost more than
waiting in the queue:

- it has held the head for half the visibility timeout: held longer, it would run twice;
- its GPUs are unhealthy, or an exclusive batch has every GPU: another worker can run it.

Each message given back is told to the run-once guard (``gave_up``), so whoever takes it
next may run it. When the consumer stops instead (connection lost, shutdown), kombu puts
the channel's unacknowledged messages back itself, and ``let_go`` only forgets them.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from taskmesh.state.client import broker_is_redis
from taskmesh.worker.recovery import put_back_line

log = logging.getLogger(__name__)


class HandBack:
    def __init__(self, controller: Any) -> None:
        self.c = controller

    def before_redelivery(self) -> None:
        """On each tick: the line goes back once its head has been held half the visibility timeout."""
        c = self.c
        if not broker_is_redis(c.consumer.app):  # RabbitMQ has no visibility timeout
            return
        options = c.consumer.app.conf.broker_transport_options or {}
        limit = float(options.get("visibility_timeout", 3600)) / 2
        if c.held and time.monotonic() - c.held[0].since > limit:
            self.line(f"held longer than half the visibility timeout ({limit:.0f}s)")

    def line(self, why: str) -> None:
        """Hand the whole held line back to the front of its queues, in order."""
        self.messages(self.c.held, why)

    def messages(self, line: Any, why: str) -> None:
        c = self.c
        if line:  # in one step, or a fetch meanwhile (intake is open while backfilling) would reorder it
            put_back_line([held.message for held in line])  # Redis unreachable: all stay held, for ``let_go``
        while line:
            held = line[-1]
            held.give_back(restore=False)
            line.pop()
            with c.lock:
                c.tags.pop(held.message.headers.get("id"), None)
            c.gave_up(held.message.headers.get("id"))
            c.counters["requeued"] += 1
            log.warning("requeued task %s: %s", held.message.headers.get("id"), why)

    def let_go(self) -> None:
        """The consumer stops (lost connection, shutdown): kombu puts its channel's unacked messages back.

        As Celery's ``Consumer.on_close`` drops its reserved requests, held and deferred
        messages are let go unacknowledged, so the copy kombu put back is the only one;
        intake, paused for the held line, resumes when the consumer starts again. Their
        tags are kept for the bootstep to put back what kombu could not (Redis was down).
        """
        c = self.c
        with c.lock:
            count = len(c.held) + len(c.deferred)
            c.let_go_tags += [str(held.message.delivery_tag) for held in c.held] + list(c.deferred)
            c.held.clear()
            c.deferred.clear()
            c.tags = {tid: tag for tid, tag in c.tags.items() if tid in c.reservations}
        c.reasons.pop("waiting", None)
        c.changed.set()
        if count:
            log.warning("consumer stopped: let go of %d held or scheduled message(s); kombu delivers them again",
                        count)

"""Task events in batches on pools without Celery's event loop (gevent, eventlet, threads).

On prefork and solo, Celery buffers task events and publishes each loop iteration's as
one ``task.multi`` message. On green and thread pools it publishes every event alone —
one broker round trip per event, three per task (received, started, succeeded) — which
Celery's own consumer marks as a gap ("This excludes eventlet/gevent, which should
actually buffer"). This step turns that same buffering on there, flushed by the worker's
timer every ``FLUSH_S`` (and by Celery at 24 events), so a short I/O task costs one
publish per batch instead of three. Flower, ``celery events`` and taskmesh's exporter see
the same events: Celery's receiver unpacks a ``.multi`` batch, in order, at most
``FLUSH_S`` later. What is buffered is flushed when the consumer stops; a batch that
cannot be sent stays in the dispatcher's offline buffer, which Celery carries over to
the next connection.
"""

from __future__ import annotations

from typing import Any

from celery import bootsteps

FLUSH_S = 0.1
TASK_GROUP = frozenset({"task"})


class TaskEventBuffer(bootsteps.StartStopStep):
    requires = ("celery.worker.consumer.events:Events",)

    def __init__(self, c: Any, **kwargs: Any) -> None:
        super().__init__(c, **kwargs)
        self.entry: Any = None
        self.dispatcher: Any = None

    def start(self, c: Any) -> None:
        if c.hub is not None or c.event_dispatcher is None:  # Celery buffers on its own event loop
            return
        self.dispatcher = c.event_dispatcher
        self.dispatcher.buffer_group = TASK_GROUP
        self.entry = c.timer.call_repeatedly(FLUSH_S, self.flush)

    def flush(self) -> None:
        if self.dispatcher is not None:
            self.dispatcher.flush(errors=False, groups=True)

    def stop(self, c: Any) -> None:
        if self.entry is not None:
            self.entry.cancel()
            self.entry = None
        self.flush()
        self.dispatcher = None

    shutdown = stop

"""Task events on a gevent worker: batched as Celery batches them on prefork (one
``task.multi`` message for several events, where Celery alone publishes each event on
its own), and every task's received, started and succeeded events still arrive, in order,
for Flower, ``celery events`` and the exporter."""

from __future__ import annotations

import collections
import socket
import threading

import pytest
from celery.events.receiver import EventReceiver

from .conftest import wait_for_workers, wait_until

APP = "tests.apps.e2e_app"
LIFE = ["task-received", "task-started", "task-succeeded"]


class CountingReceiver(EventReceiver):
    """A Celery event receiver that also counts the events each broker message carried."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.per_message: list[int] = []

    def _receive(self, body, message, *args, **kwargs):
        self.per_message.append(len(body) if isinstance(body, list) else 1)
        return super()._receive(body, message, *args, **kwargs)


@pytest.mark.slow
def test_a_gevent_worker_sends_task_events_in_batches_and_loses_none(e2e, processes):
    node = f"light@{socket.gethostname()}"
    processes.celery_worker(APP, "-Q", "cpu_light", "-P", "gevent", "-c", "20", "-n", node,
                            "--without-mingle", "--without-gossip")
    wait_for_workers(e2e.app, [node])
    seen: dict[str, list[str]] = collections.defaultdict(list)

    def record(event: dict) -> None:
        if event.get("hostname") == node and event["type"] in LIFE:
            seen[event["uuid"]].append(event["type"])

    with e2e.app.connection_for_read() as connection:
        receiver = CountingReceiver(connection, handlers={"*": record}, app=e2e.app)
        listening = threading.Thread(target=receiver.capture, kwargs={"limit": None, "timeout": None}, daemon=True)
        listening.start()
        probes: list = []

        def listening() -> bool:  # a probe task is sent until its events are seen: the receiver listens
            probes.append(e2e.on_io.delay(0.0, label="probe"))
            return any(seen[p.id] == LIFE for p in probes)

        wait_until(listening, "a probe's events", 20)
        receiver.per_message.clear()
        results = [e2e.on_io.delay(0.0, label=i) for i in range(40)]
        for result in results:
            result.get(timeout=30)
        wait_until(lambda: all(seen[r.id] == LIFE for r in results), "every task's three events, in order", 10)
        receiver.should_stop = True
    assert max(receiver.per_message) > 1, receiver.per_message  # batched, not one message per event

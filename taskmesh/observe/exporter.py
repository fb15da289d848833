"""``taskmesh exporter``: the Prometheus endpoint, and the task timings fed by Celery events.

Scrape-time state comes from ``metrics.TaskmeshCollector``. How long tasks run and
wait cannot be read from Redis afterwards, so it is learnt the way Flower learns it:
from Celery's own task events (taskmesh apps send them, ``task-sent`` included, by
default), received on a thread and counted into two histograms by task and queue.

Event fields, as Celery 5.7 sends them: ``task-sent`` (producer, ``celery/app/amqp.py``)
has ``uuid``, ``name``, ``queue``, ``routing_key``; ``task-received``
(``celery/worker/strategy.py``) has ``uuid``, ``name`` but no queue; ``task-started``,
``task-succeeded`` (with the worker-measured ``runtime``) and ``task-failed``
(``celery/worker/request.py``) have ``uuid``; all carry ``timestamp``, which the
receiver converts to local time. Queue wait is started − sent: it includes the time
a worker held the message until its memory was free, which is the wait users notice.
"""

from __future__ import annotations

import collections
import errno
import logging
import signal
import threading
from typing import Any

import click
from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics, start_http_server

from taskmesh.core.errors import TaskmeshError
from taskmesh.observe.metrics import EVENT_FED, TaskmeshCollector
from taskmesh.state.client import STATE_ENV, state_redis_url

log = logging.getLogger(__name__)
DEFAULT_PORT = 9808
MAX_PENDING = 50_000  # task ids between sent and finished that are remembered; the oldest go first
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 7200,
           float("inf"))
UNKNOWN_QUEUE = "unknown"


class ExporterError(TaskmeshError):
    """The exporter cannot start as asked; the message says what to change."""


class TaskTimings:
    """Runtime and queue-wait histograms, fed by a Celery event receiver thread.

    Histograms are the one kind of state kept in the exporter: they live in this
    object's registry, not in prometheus_client's global one.
    """

    def __init__(self, app: Any, registry: CollectorRegistry, max_pending: int = MAX_PENDING) -> None:
        self.app = app
        self.max_pending = max_pending
        self.runtime = self._histogram("taskmesh_task_runtime_seconds", registry)
        self.wait = self._histogram("taskmesh_task_queue_wait_seconds", registry)
        self.events = Counter("taskmesh_exporter_events", EVENT_FED["taskmesh_exporter_events"][1], registry=registry)
        self.pending: collections.OrderedDict[str, dict[str, Any]] = collections.OrderedDict()
        self.stopping = threading.Event()
        self.receiver: Any = None
        self.thread = threading.Thread(target=self._run, name="taskmesh-events", daemon=True)

    @staticmethod
    def _histogram(name: str, registry: CollectorRegistry) -> Histogram:
        _, text, labels = EVENT_FED[name]
        return Histogram(name, text, list(labels), buckets=BUCKETS, registry=registry)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.stopping.set()
        if self.receiver is not None:
            self.receiver.should_stop = True
        self.thread.join(5)

    def _run(self) -> None:
        """Receive until stopped; reconnect with backoff when the broker goes away."""
        backoff = 1.0
        while not self.stopping.is_set():
            try:
                with self.app.connection_for_read() as conn:
                    self.receiver = self.app.events.Receiver(conn, handlers={"*": self.on_event})
                    if self.stopping.is_set():
                        return
                    backoff = 1.0
                    self.receiver.capture(limit=None, timeout=None, wakeup=False)
            except Exception as exc:  # a broker outage must not end the thread: the next loop reconnects
                if self.stopping.is_set():
                    return
                log.warning("task events: %s; reconnecting in %.0fs", exc, backoff)
                self.stopping.wait(backoff)
                backoff = min(backoff * 2, 30.0)

    def on_event(self, event: dict[str, Any]) -> None:
        self.events.inc()
        kind, task_id = event.get("type"), event.get("uuid")
        if not task_id or not str(kind).startswith("task-"):
            return
        if kind == "task-sent":
            self._waited(self._remember(task_id, name=event.get("name"),
                                        queue=event.get("queue") or event.get("routing_key"),
                                        sent=event.get("timestamp")))
        elif kind == "task-received":
            self._remember(task_id, name=event.get("name"))
        elif kind == "task-started":
            self._waited(self._remember(task_id, started=event.get("timestamp")))
        elif kind in ("task-succeeded", "task-failed"):
            entry = self.pending.pop(task_id, None) or {}
            runtime = event.get("runtime")
            if runtime is None and entry.get("started") is not None and event.get("timestamp") is not None:
                runtime = event["timestamp"] - entry["started"]
            if runtime is not None and entry.get("name"):
                self.runtime.labels(*self._labels(entry)).observe(max(0.0, float(runtime)))

    def _waited(self, entry: dict[str, Any]) -> None:
        """Observe the queue wait once both ends are known: ``task-sent`` comes from the producer
        and ``task-started`` from the worker, so either may arrive first (an idle worker woken by
        the send starts the task before its producer has published ``task-sent``)."""
        if entry.get("sent") is not None and entry.get("started") is not None and entry.get("name") and (
                not entry.get("waited")):
            entry["waited"] = True
            self.wait.labels(*self._labels(entry)).observe(max(0.0, entry["started"] - entry["sent"]))

    def _remember(self, task_id: str, **fields: Any) -> dict[str, Any]:
        entry = self.pending.setdefault(task_id, {})
        entry.update({k: v for k, v in fields.items() if v is not None or k not in entry})
        self.pending.move_to_end(task_id)
        while len(self.pending) > self.max_pending:
            self.pending.popitem(last=False)
        return entry

    def _labels(self, entry: dict[str, Any]) -> tuple[str, str]:
        """Task name and queue; a task whose ``task-sent`` was missed gets its profile's queue."""
        name = entry["name"]
        queue = entry.get("queue")
        if not queue:
            requirement = getattr(self.app.tasks.get(name), "requirement", None)
            queue = requirement.profile.queue if requirement is not None else UNKNOWN_QUEUE
        return name, queue


def serve(app: Any, port: int, address: str) -> None:
    """Serve ``/metrics`` until SIGTERM or SIGINT."""
    if not state_redis_url(app):
        raise ExporterError(f"the exporter reads taskmesh's Redis; app {app.main!r} has none: set broker_url "
                            f"or TASKMESH_BROKER_URL to redis://HOST:PORT/0 (on RabbitMQ: {STATE_ENV})")
    disable_created_metrics()
    registry = CollectorRegistry()
    registry.register(TaskmeshCollector(app))
    timings = TaskTimings(app, registry)
    try:
        server, _ = start_http_server(port, addr=address, registry=registry)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise ExporterError(f"port {port} on {address} is in use; pass --port with a free port") from None
        raise ExporterError(f"cannot listen on {address}:{port} ({exc.strerror}); pass --address or --port") from None
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    timings.start()
    click.echo(f"taskmesh: exporter serving http://{address}:{port}/metrics", err=True)
    try:
        while not stop.wait(1.0):
            pass
    finally:
        server.shutdown()
        timings.stop()


@click.command()
@click.option("--port", type=click.IntRange(1, 65535), default=DEFAULT_PORT, show_default=True,
              help="Port of the /metrics endpoint.")
@click.option("--address", default="127.0.0.1", show_default=True,
              help="Address to listen on (loopback by default; 0.0.0.0 exposes it to the network).")
@click.pass_context
def exporter(ctx: click.Context, port: int, address: str) -> None:
    """Serve Prometheus metrics: queues, GPUs (DCGM names), workers, counters, alerts, task timings."""
    from taskmesh.app.loading import app_path, load_app

    path = app_path(ctx)
    if not path:
        raise click.UsageError("exporter needs the app: taskmesh -A myapp.tasks exporter --port 9808")
    serve(load_app(path), port, address)

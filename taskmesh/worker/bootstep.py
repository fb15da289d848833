"""The admission step: a Celery consumer bootstep that holds a GPU task until its
memory is really there, and pauses the worker's intake meanwhile.

It builds this worker's ``AdmissionController`` once (a consumer step is stopped and
started again on every broker reconnect, so ``start`` is re-entrant, and ``stop`` lets
go of the messages the dead channel delivered), publishes it as
``consumer.taskmesh_admission`` for the task strategy, runs the controller's tick on
the consumer's timer, and starts the heartbeat thread. Registered on every app by
``create_app``; a plain ``celery worker`` gets it too, and is told once at start what it
is missing against a typed ``taskmesh worker`` (``untyped_warning``).
"""

from __future__ import annotations

import logging
import os
import socket
import uuid
from typing import Any

from celery import bootsteps

from taskmesh.core.activity import gpu_summary
from taskmesh.core.gate import Gate
from taskmesh.core.need_queues import family
from taskmesh.core.profiles import Profile
from taskmesh.core.redact import redacted
from taskmesh.hardware.inventory import detect, visible_gpu_uuids
from taskmesh.hardware.providers import provider_from_env
from taskmesh.state.client import REDIS_SCHEMES, STATE_ENV, broker_redis_url, state_client, state_redis_url
from taskmesh.state.ledger import Ledger
from taskmesh.state.once import OnceClaims, keep_done_s
from taskmesh.state.registry import Registry
from taskmesh.worker import control, strategy
from taskmesh.worker.controller import AdmissionController
from taskmesh.worker.envelope import guard_unreadable
from taskmesh.worker.fetch import hold_fetched_in, use_for_redis
from taskmesh.worker.heartbeat import Heartbeat
from taskmesh.worker.lease import Lease
from taskmesh.worker.once import OnceGuard
from taskmesh.worker.recovery import guard_restore, put_back
from taskmesh.worker.report import Reporter
from taskmesh.worker.unknown_task import one_line_unknown_tasks

log = logging.getLogger(__name__)
TICK_S = 0.5
IO_POOLS = ("gevent", "eventlet")
__all__ = ["AdmissionStep", "control"]


def untyped_warning(app_name: str, queues: list[str], pool: str, has_gpu: bool | None) -> str | None:
    """What a worker started by hand lacks, and the fix; ``None`` when it lacks nothing.

    I/O tasks (``cpu_light``) are written for a gevent pool's hundred slots; GPU tasks on a
    host with no GPU can only wait (*has_gpu* ``None``: not known, nothing said).
    """
    families = {q.split(".", 1)[0] for q in queues}
    missing = []
    if "cpu_light" in families and pool not in IO_POOLS:
        missing.append(f"cpu_light (I/O) tasks run on {pool}, not gevent")
    if "gpu" in families and has_gpu is False:
        missing.append("gpu tasks are taken on a host with no GPU (no NVML, no TASKMESH_SIMULATE_GPUS)")
    if not missing:
        return None
    return (f"taskmesh: this worker consumes {', '.join(sorted(queues))} with one {pool} pool: "
            f"{'; '.join(missing)}. Start typed workers with `taskmesh -A {app_name} worker --profile all`, "
            f"or give each worker its queue and pool: `celery -A {app_name} worker -Q cpu_light -P gevent`, "
            "`-Q cpu_intensive`, `-Q gpu` on a GPU host")


def pool_kind(c: Any) -> str:
    """The consumer's pool by its module's name: prefork, gevent, eventlet, thread or solo."""
    return type(c.pool).__module__.rsplit(".", 1)[-1]


def share_result_backend(c: Any) -> None:
    """On a gevent, eventlet or threads pool with a Redis result backend, one backend for the worker.

    Celery keeps the backend per thread unless ``result_backend_thread_safe`` says otherwise,
    and under gevent each greenlet is a thread: every task built a new Redis backend (a
    sixth of a gevent worker's time per no-op task, ``benchmarks/overhead.py``). redis-py's
    client is safe to share, and Celery 5.7's Redis result consumer serialises its pubsub
    with a lock (a task on gevent may wait on a subtask's result: Celery allows it there).
    Other backends, and producers, keep Celery's default."""
    if pool_kind(c) in ("gevent", "eventlet", "thread") and str(c.app.conf.result_backend or "").startswith(
            REDIS_SCHEMES):
        c.app.conf.result_backend_thread_safe = True
        c.app._backend = c.app._get_backend()  # kept for every thread now: the setter reads the flag


class AdmissionStep(bootsteps.StartStopStep):
    requires = ("celery.worker.consumer.tasks:Tasks",)
    label = "taskmesh admission"

    def __init__(self, c: Any, **kwargs: Any) -> None:
        super().__init__(c, **kwargs)
        self.controller: AdmissionController | None = None
        self.reporter: Reporter | None = None
        self.heartbeat: Heartbeat | None = None
        self.once: OnceGuard | None = None
        self.timer_entry: Any = None
        self.warned = False
        c.taskmesh_admission = None
        share_result_backend(c)
        one_line_unknown_tasks()
        self.fetching = (broker_redis_url(c.app).startswith(("redis://", "rediss://"))
                         and not c.app.conf.broker_transport)
        if self.fetching:
            use_for_redis()  # before the consumer connects: a fetch records what it takes (worker/fetch.py)

    def _create(self, c: Any) -> AdmissionController | None:
        app = c.app
        if not state_redis_url(app):
            broker = redacted(str(app.conf.broker_url or ""))
            gpu = sorted(q.name for q in c.task_consumer.queues if family(q.name) == Profile.GPU_INTENSIVE.queue)
            if gpu:  # fail closed: with no ledger a GPU task would run with nothing reserved
                log.error("taskmesh: this worker consumes %s, but its broker %s is not Redis and no %s names the "
                          "Redis where taskmesh keeps the GPU ledger, so GPU tasks would run unguarded: it stops. "
                          "Set %s to a Redis URL (e.g. redis://127.0.0.1:6379/0), use a Redis broker, or consume "
                          "no GPU queue (-Q cpu_intensive,cpu_light,mixed)", ", ".join(gpu), broker, STATE_ENV,
                          STATE_ENV)
                raise SystemExit(2)
            log.warning("taskmesh admission needs Redis for its state; the broker %s is not Redis and %s is not "
                        "set, so tasks are not admitted", broker, STATE_ENV)
            return None
        config = app.taskmesh_config
        client = state_client(app)
        ttl = config.admission.reservation_ttl_s
        provider = provider_from_env(config.simulate_gpus, control=client)
        inventory = detect(config, provider)
        gate = Gate(
            host=socket.gethostname(),
            provider=provider,
            ledger=Ledger(client, ttl_s=ttl),
            config=config.admission,
            gpu_uuids=visible_gpu_uuids(provider),
            cpu_threads=inventory.cpu_threads,
            memory_total_mib=inventory.memory_total_mib,
        )
        registry = Registry(client, alive_s=ttl, memory_s=config.admission.registry_memory_s,
                            dead_after_s=config.admission.dead_after_s)
        return AdmissionController(c, gate, registry, incarnation=uuid.uuid4().hex, lease=Lease(ttl))

    def start(self, c: Any) -> None:
        if self.controller is None:
            self.controller = self._create(c)
            self._warn_if_untyped(c)
            if self.controller is None:
                return
            strategy.current = self.controller
            self.once = self._once_guard(c.app, self.controller)
            strategy.once_guard = self.once
            strategy.admit_when_due(c, self.controller)
            self.reporter = Reporter(self.controller)
            self.heartbeat = Heartbeat(c.app, self.controller, self.reporter)
            self.heartbeat.refreshers.append(self.once.refresh)
            self.controller.handed_on.append(self.once.handed_on)
            self.heartbeat.start()
            if self.fetching and _fetches_where_state_is(c.app):
                registry = self.controller.registry
                hold_fetched_in(registry.held_set(f"{self.controller.node}#{self.controller.incarnation}"),
                                registry.fetched)
            _say_mixed_without_gpu(self.controller)
        c.taskmesh_admission = self.controller
        guard_unreadable(c, lambda: self.controller.counters.update(("unreadable",)))
        guard_restore(getattr(c.task_consumer, "channel", None))
        if self.controller.let_go_tags:  # kombu put them back as the old channel closed, unless Redis was down
            with c.app.connection_for_write() as conn:
                restored = put_back(conn.default_channel, self.controller.let_go_tags)
            if restored:
                log.warning("put back %d held message(s) kombu could not restore as the connection dropped", restored)
            self.controller.let_go_tags.clear()
        self.controller.check()  # a sick GPU, no GPU at all or a host under pressure: from the start
        self.timer_entry = c.timer.call_repeatedly(TICK_S, self._tick)

    @staticmethod
    def _once_guard(app: Any, controller: AdmissionController) -> OnceGuard:
        claims = OnceClaims(controller.registry.client, holder=f"{controller.node}#{controller.incarnation}",
                            ttl_s=app.taskmesh_config.admission.dead_after_s,
                            keep_done_s=keep_done_s(app.conf.result_expires))
        return OnceGuard(controller, claims)

    def _warn_if_untyped(self, c: Any) -> None:
        if self.warned:  # start runs again on every broker reconnect: say it once
            return
        self.warned = True
        queues = [q.name for q in c.task_consumer.queues] if c.task_consumer else []
        pool = pool_kind(c)
        has_gpu = bool(self.controller.gate.known) if self.controller is not None else None
        message = untyped_warning(c.app.main or "app", queues, pool, has_gpu)
        if message:
            log.warning(message)

    def _tick(self) -> None:
        self.controller.tick()
        self.once.tick()
        self.reporter.tick()

    def stop(self, c: Any) -> None:
        """On every reconnect (Celery stops the consumer's steps after ``Consumer.on_close``) and at shutdown."""
        if self.timer_entry is not None:
            self.timer_entry.cancel()
            self.timer_entry = None
        if self.controller is not None:
            self.controller.hand_back.let_go()

    def shutdown(self, c: Any) -> None:
        self.stop(c)
        if self.heartbeat is not None:
            self.heartbeat.stop()
        if self.controller is not None:
            self.controller.release_all()
            self.controller.registry.stopped(self.reporter.record())
            strategy.current = strategy.once_guard = None

    def info(self, c: Any) -> dict[str, Any]:
        """``inspect stats``: the readable GPU line first (Flower's "Other" tab), then the full state."""
        if getattr(c, "taskmesh_admission", None) is None or self.reporter is None:
            return {}
        state = self.reporter.state()
        return {"taskmesh_gpus": gpu_summary(state), "taskmesh": state} if state["gpus"] else {"taskmesh": state}


def _say_mixed_without_gpu(controller: AdmissionController) -> None:
    """A mixed worker with no GPU runs mixed tasks on CPU and hands GPU tasks on: say so once,
    as a warning unless ``CUDA_VISIBLE_DEVICES=""`` shows it was planned that way."""
    if controller.no_gpu is None or "mixed" not in controller.intake.consumed():
        return
    level = logging.INFO if os.environ.get("CUDA_VISIBLE_DEVICES") == "" else logging.WARNING
    log.log(level, "%s sees no GPU (%s): mixed tasks run on CPU; gpu tasks are sent to queue gpu",
            controller.node, controller.no_gpu)


def _fetches_where_state_is(app: Any) -> bool:
    """Whether the worker's fetch reads the Redis that holds taskmesh's state (the usual case:
    no ``taskmesh_state_url`` and no separate read URL), so it can add what it takes to the
    worker's in-flight set in the same script (``worker/fetch.py``)."""
    read = app.conf.broker_read_url
    return state_redis_url(app) == broker_redis_url(app) and (not read or read == broker_redis_url(app))

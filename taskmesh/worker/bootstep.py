"""The admission step: a Celery consumer bootstep that holds a GPU task until its
memory is really there, and pauses the worker's intake meanwhile.

It builds this worker's ``AdmissionController`` once (a consumer step is stopped and
started again on every broker reconnect, so ``start`` is re-entrant, and ``stop`` lets
go of the messages the dead channel delivered), publishes it as
``consumer.taskmesh_admission`` for the task strategy, runs the controller's tick on
the consumer's timer, and starts the heartbeat thread. Registered on every app by
``create_app``; a plain ``celery worker`` gets it too.
"""

from __future__ import annotations

import logging
import socket
import uuid
from typing import Any

from celery import bootsteps

from taskmesh.core.activity import gpu_summary
from taskmesh.core.gate import Gate
from taskmesh.hardware.inventory import detect, visible_gpu_uuids
from taskmesh.hardware.providers import provider_from_env
from taskmesh.state.client import broker_client, broker_redis_url
from taskmesh.state.ledger import Ledger
from taskmesh.state.registry import Registry
from taskmesh.worker import control, strategy
from taskmesh.worker.controller import AdmissionController
from taskmesh.worker.heartbeat import Heartbeat
from taskmesh.worker.recovery import put_back
from taskmesh.worker.report import Reporter

log = logging.getLogger(__name__)
TICK_S = 0.5
__all__ = ["AdmissionStep", "control"]


class AdmissionStep(bootsteps.StartStopStep):
    requires = ("celery.worker.consumer.tasks:Tasks",)
    label = "taskmesh admission"

    def __init__(self, c: Any, **kwargs: Any) -> None:
        super().__init__(c, **kwargs)
        self.controller: AdmissionController | None = None
        self.reporter: Reporter | None = None
        self.heartbeat: Heartbeat | None = None
        self.timer_entry: Any = None
        c.taskmesh_admission = None

    def _create(self, c: Any) -> AdmissionController | None:
        app = c.app
        if not broker_redis_url(app):
            log.warning("taskmesh admission needs a Redis broker; %s is not one, so tasks are not admitted",
                        app.conf.broker_url or "")
            return None
        config = app.taskmesh_config
        client = broker_client(app)
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
        registry = Registry(client, alive_s=ttl, memory_s=config.admission.registry_memory_s)
        return AdmissionController(c, gate, registry, incarnation=uuid.uuid4().hex)

    def start(self, c: Any) -> None:
        if self.controller is None:
            self.controller = self._create(c)
            if self.controller is None:
                return
            strategy.current = self.controller
            strategy.admit_when_due(c, self.controller)
            self.reporter = Reporter(self.controller)
            self.heartbeat = Heartbeat(c.app, self.controller, self.reporter)
            self.heartbeat.start()
        c.taskmesh_admission = self.controller
        if self.controller.let_go_tags:  # kombu put them back as the old channel closed, unless Redis was down
            with c.app.connection_for_write() as conn:
                restored = put_back(conn.default_channel, self.controller.let_go_tags)
            if restored:
                log.warning("put back %d held message(s) kombu could not restore as the connection dropped", restored)
            self.controller.let_go_tags.clear()
        self.controller.check()  # a sick GPU or a host under pressure takes nothing, from the start
        self.timer_entry = c.timer.call_repeatedly(TICK_S, self._tick)

    def _tick(self) -> None:
        self.controller.tick()
        self.reporter.tick()

    def stop(self, c: Any) -> None:
        """On every reconnect (Celery stops the consumer's steps after ``Consumer.on_close``) and at shutdown."""
        if self.timer_entry is not None:
            self.timer_entry.cancel()
            self.timer_entry = None
        if self.controller is not None:
            self.controller.let_go()

    def shutdown(self, c: Any) -> None:
        self.stop(c)
        if self.heartbeat is not None:
            self.heartbeat.stop()
        if self.controller is not None:
            self.controller.release_all()
            self.controller.registry.stopped(self.reporter.record())
            strategy.current = None

    def info(self, c: Any) -> dict[str, Any]:
        """``inspect stats``: the readable GPU line first (Flower's "Other" tab), then the full state."""
        if getattr(c, "taskmesh_admission", None) is None or self.reporter is None:
            return {}
        state = self.reporter.state()
        return {"taskmesh_gpus": gpu_summary(state), "taskmesh": state} if state["gpus"] else {"taskmesh": state}

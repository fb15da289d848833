"""Decisions at submit time: refuse what can never run, push back when a queue is full,
send GPU work where it fits (a warm model's tasks to its model queue, ``app.affinity``), and
take a fallback when the preferred queue is saturated.

Everything here runs in the producer, inside ``TaskmeshCelery.send_task`` (which
``apply_async`` and every canvas end in; ``app.sending``), before a message exists, so a
refusal leaves the broker exactly as it was. Tasks that declare
no GPU, no fallback and go to a queue without ``max_depth`` take a fast path with no
Redis round trip. What the fleet has is read from the worker registry, cached for two
seconds: a producer does not need it fresher than workers announce it.

A broker that cannot be reached is retried as Celery retries a publish
(``task_publish_retry_policy``), then reported as ``app.broker_errors.BrokerUnreachable``.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from kombu.utils.functional import retry_over_time

from taskmesh.app.affinity import Affinity
from taskmesh.app.broker_errors import REDIS_DOWN, broker_unreachable
from taskmesh.app.models import declared_models
from taskmesh.core.claims import gpu_pool
from taskmesh.core.errors import InfeasibleRequirement, QueueFull
from taskmesh.core.headers import FALLBACK_HEADER
from taskmesh.core.model_queues import model_queue
from taskmesh.core.need_queues import family, fits, need_queue
from taskmesh.core.profiles import Profile
from taskmesh.core.records import Capacity, WorkerRecord
from taskmesh.core.requirements import Requirement
from taskmesh.core.submit import infeasible
from taskmesh.state.ledger import Ledger
from taskmesh.state.queues import app_queue_depths
from taskmesh.state.registry import Registry

log = logging.getLogger(__name__)
REGISTRY_CACHE_S = 2.0
RETRY_KEYS = ("max_retries", "interval_start", "interval_step", "interval_max")
TOLD_KEEP = 1024  # lenient sends already warned about, remembered up to this many


def queue_name(queue: Any) -> str:
    return queue if isinstance(queue, str) else queue.name


class SubmitPolicy:
    """One per app; holds the registry cache."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.config = app.taskmesh_config
        self.registry = Registry(app.redis(), memory_s=self.config.admission.registry_memory_s,
                                 alive_s=self.config.admission.reservation_ttl_s)
        self._cached: tuple[float, list[WorkerRecord], Capacity] = (0.0, [], Registry.summarise([]))
        self._verdicts: dict[Requirement, tuple[str | None, bool]] = {}  # per registry view: problem, fits all
        self._registered: set[str] = set()
        self._warned: set[str] = set()
        self._told: set[tuple[str, str]] = set()
        self.affinity = Affinity(app.redis(), app.conf.broker_url)

    def workers(self) -> list[WorkerRecord]:
        return self._view()[0]

    def _view(self) -> tuple[list[WorkerRecord], Capacity]:
        at, records, capacity = self._cached
        if time.monotonic() - at > REGISTRY_CACHE_S:
            records = self.registry.workers()
            capacity = Registry.summarise(records)
            self._cached = (time.monotonic(), records, capacity)
            self._verdicts.clear()
        return records, capacity

    def _verdict(self, requirement: Requirement) -> tuple[str | None, bool, Capacity]:
        """What the fleet says of *requirement*, worked out once per registry view."""
        _, capacity = self._view()
        if requirement not in self._verdicts:
            margin = self.config.admission.safety_margin_mib
            self._verdicts[requirement] = (
                infeasible(requirement, capacity, margin),
                all(fits(g, requirement, margin) for g in capacity.gpus),
            )
        problem, fits_all = self._verdicts[requirement]
        return problem, fits_all, capacity

    def prepare(self, task_name: str, requirement: Requirement, options: dict[str, Any],
                routed: str | None = None, lenient: str | None = None) -> None:
        """Adjust *options* (queue, headers) or raise; nothing has been sent yet.

        *routed* is the queue Celery's router picks (``None``: the profile's); one other than
        the profile's (a user route) is honoured as an explicit ``queue=`` is. *lenient* says
        why this send must not be refused (``app.sending``): a refusal is then logged and the
        task sent. Each try works on a copy, so one cut short by a lost connection leaves
        nothing half-applied (a fallback queue taken for an explicit one) for the next.
        """
        def attempt() -> dict[str, Any]:
            trial = {**options, "headers": dict(options.get("headers") or {})}
            self._prepare(task_name, requirement, trial, routed, lenient)
            return trial

        conf = self.app.conf
        policy = {**(conf.task_publish_retry_policy or {}), **(options.get("retry_policy") or {})}
        try:
            if options.get("retry", conf.task_publish_retry):
                done = retry_over_time(attempt, REDIS_DOWN, **{k: policy[k] for k in RETRY_KEYS if k in policy})
            else:
                done = attempt()
        except REDIS_DOWN as exc:
            raise broker_unreachable(self.app, exc) from exc
        options.update(done)

    def _prepare(self, task_name: str, requirement: Requirement, options: dict[str, Any],
                 routed: str | None, lenient: str | None) -> None:
        chosen, explicit = self._destination(requirement, options, routed)
        queue = chosen
        if requirement.needs_gpu or requirement.cpu_threads > 1 or requirement.memory_mib:
            queue = self._place(task_name, requirement, queue, explicit, lenient)
        if requirement.fallback is not None and not explicit and self._saturated(requirement, queue):
            self.registry.count("fallbacks")
            options.setdefault("headers", {})[FALLBACK_HEADER] = queue
            queue = requirement.fallback.queue
            log.info("%s: %s is saturated; sent to its fallback %s", task_name, family(queue), queue)
        max_depth = self.config.queue(family(queue)).max_depth
        if max_depth:
            self._wait_for_room(task_name, queue, max_depth, lenient)
        if queue != chosen:
            options["queue"] = queue

    def check(self, task_name: str, requirement: Requirement, options: dict[str, Any],
              routed: str | None = None) -> None:
        """Raise as ``prepare`` would, for a canvas step a worker sends later; changes nothing
        (a fallback is decided when the step is sent)."""
        queue, explicit = self._destination(requirement, options, routed)
        if requirement.needs_gpu or requirement.cpu_threads > 1 or requirement.memory_mib:
            queue = self._place(task_name, requirement, queue, explicit)
        max_depth = self.config.queue(family(queue)).max_depth
        if max_depth:
            self._wait_for_room(task_name, queue, max_depth)

    @staticmethod
    def _destination(requirement: Requirement, options: dict[str, Any], routed: str | None) -> tuple[str, bool]:
        """The queue the send goes to as it stands, and whether someone other than its profile chose it."""
        if options.get("queue") is not None:
            return queue_name(options["queue"]), True
        routed = routed or requirement.profile.queue
        return routed, routed != requirement.profile.queue

    def _place(self, task_name: str, requirement: Requirement, queue: str, explicit: bool,
               lenient: str | None = None) -> str:
        problem, fits_all, capacity = self._verdict(requirement)
        if problem:
            self.registry.count("infeasible")
            message = f"task {task_name!r} can never run: {problem}; nothing was sent"
            if lenient is not None:
                log.warning("%s; sent anyway (%s)", message.rsplit(";", 1)[0], lenient)
                return queue
            if self.config.admission.on_infeasible == "raise":
                raise InfeasibleRequirement(
                    message + " (set admission.on_infeasible: warn to queue it anyway)"
                )
            log.warning("%s; queued anyway (admission.on_infeasible: warn)", message.rsplit(";", 1)[0])
            return queue
        if not requirement.needs_gpu or requirement.profile is not Profile.GPU_INTENSIVE:
            return queue
        if not capacity.gpus:
            if task_name not in self._warned:
                self._warned.add(task_name)
                log.warning("%s: no GPU worker has registered yet; queued on %s unchecked", task_name, queue)
            return queue
        if explicit:
            return queue
        if fits_all and requirement.gpus == 1 and self.config.admission.affinity:
            return self.affinity.queue_for(requirement.model, queue, self.live_nodes)
        name = need_queue(requirement)  # several GPUs at once: only a worker that sees that many may take it
        if name not in self._registered:
            self.registry.register_need_queue(name, requirement)
            self._registered.add(name)
        return name

    def live_nodes(self) -> set[str]:
        """The nodes of the workers alive in the cached registry view."""
        return {r.node for r in self.workers() if self.registry.is_alive(r)}

    def _saturated(self, requirement: Requirement, queue: str) -> bool:
        """Deeper than ``fallback_depth`` and no live GPU can take the task now."""
        waiting = self._waiting([queue])
        if waiting <= self.config.queue(family(queue)).fallback_depth:
            return False
        margin = self.config.admission.safety_margin_mib
        live = [g for r in self.workers() if self.registry.is_alive(r) for g in r.gpus
                if g.healthy and fits(g, requirement, margin)]
        if not live:
            return True
        used = Ledger(self.app.redis()).used([gpu_pool(g.uuid) for g in live])
        need = requirement.vram_mib or 0
        return not any(used[gpu_pool(g.uuid)] + need <= g.memory_total_mib - margin for g in live)

    def _waiting(self, queues: list[str]) -> int:
        if "gpu" in queues:
            queues = queues + list(self.registry.need_queues()) + [model_queue(m) for m in declared_models(self.app)]
        depths = app_queue_depths(self.app, queues, client=self.app.redis(), count_in_flight=False)
        return sum(d.waiting for d in depths.values())

    def _wait_for_room(self, task_name: str, queue: str, max_depth: int, lenient: str | None = None) -> None:
        if lenient is not None:
            told = (family(queue), lenient)  # once per group, parent or retry: a group may be large
            if told not in self._told and (waiting := self._waiting([family(queue)])) >= max_depth:
                if len(self._told) > TOLD_KEEP:
                    self._told.clear()
                self._told.add(told)
                log.warning("queue %r has %d tasks waiting, its max_depth (queues.%s.max_depth); %r sent anyway (%s)",
                            family(queue), waiting, family(queue), task_name, lenient)
            return
        deadline = time.monotonic() + self.config.admission.queue_full_wait_s
        while (waiting := self._waiting([family(queue)])) >= max_depth:
            if time.monotonic() >= deadline:
                self.registry.count("queue_full")
                raise QueueFull(
                    f"queue {family(queue)!r} has {waiting} tasks waiting, its max_depth "
                    f"(queues.{family(queue)}.max_depth in {self.config.source}); {task_name!r} was not sent. "
                    "Retry later, raise max_depth, or set admission.queue_full_wait_s to wait for room"
                )
            time.sleep(0.05)

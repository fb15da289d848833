"""The admission controller: one per worker, between Celery's consumer and the ``Gate``.

It owns the worker-side state of admission: the messages held because they do not
fit yet (in arrival order; ``core.held_line`` says which start, backfilling past a
waiting head), the reservations of admitted tasks and what was learned of their run
times, and why intake is paused (``intake``). ``bootstep`` wires it into Celery; the
decisions themselves are the ``Gate``'s.

Fail closed: a message that cannot be read is refused (``refusal``) before anything
is reserved, and a worker that sees no GPU consumes no GPU queue: it says why at
start and in its state, and any GPU task it is handed anyway goes to the ``gpu``
queue, which it does not consume, so nothing loops.
A task is admitted when it is about to run: one that Celery schedules for later (an
ETA, ``self.retry()``, a rate limit) is *deferred* on arrival with nothing reserved,
and offered when Celery hands it to the pool (``due``); reserved on arrival, it would
be reconciled away before it ran, as Celery does not count it as reserved meanwhile.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from taskmesh.core.activity import GpuActivity
from taskmesh.core.forecast import Forecast, RunTimes
from taskmesh.core.gate import Decision, Gate, Reroute, Wait
from taskmesh.core.headers import GPUS_HEADER, REQUIREMENT_HEADER
from taskmesh.hardware.inventory import gpu_problem
from taskmesh.hardware.pressure import host_pressure
from taskmesh.state.registry import Registry
from taskmesh.worker.exclusive import ExclusiveFollower
from taskmesh.worker.gpu_queues import refuse_gpu_queues, reroute, subscribe_need_queues
from taskmesh.worker.hand_back import HandBack
from taskmesh.worker.held import Held, Running, expired, forecast_of, start_held, takes_more
from taskmesh.worker.intake import Intake
from taskmesh.worker.lease import Lease
from taskmesh.worker.model_queues import ModelQueues
from taskmesh.worker.refusal import refuse, requirement_of
from taskmesh.worker.strategy import is_revoked, live_request_ids
from taskmesh.worker.warm import WarmModels

log = logging.getLogger(__name__)
RECONCILE_AFTER_S = 2.0
NOT_PAUSING = ("waiting", "no_gpu", "exclusive")  # reasons that do not stop the worker's whole intake


class AdmissionController:
    def __init__(self, consumer: Any, gate: Gate, registry: Registry, incarnation: str, lease: Lease) -> None:
        self.consumer = consumer
        self.gate = gate
        self.registry = registry
        self.incarnation = incarnation
        self.lease = lease  # renewed by the heartbeat; no new work while it is in doubt
        self.node = consumer.hostname
        self.intake = Intake(consumer)
        self.lock = threading.Lock()
        self.held: collections.deque[Held] = collections.deque()
        self.reservations: dict[str, Running] = {}
        self.tags: dict[str, str] = {}  # task id → delivery tag of messages this worker holds
        self.deferred: dict[str, float] = {}  # delivery tag → arrival (monotonic), of messages Celery schedules
        self.let_go_tags: list[str] = []  # of held and deferred messages, when the consumer last stopped
        self.reasons: dict[str, str] = {}  # why intake is paused: kind → detail
        self.counters = collections.Counter()
        self.activity = GpuActivity()
        self.runtimes: collections.Counter[str] = collections.Counter()  # "q:<queue>:sum"/":count", "t:<task>:..."
        self.run_times = RunTimes()  # per task name, kept (the heartbeat drains ``runtimes`` into the registry)
        self.subscribed: set[str] = set()
        self.changed = threading.Event()  # wakes the heartbeat: what this worker holds changed
        self.pool_history: list[tuple[float, int]] = []  # (time, size) after each resize
        self.policy = gate.config.line_policy()
        self.no_gpu = None if gate.known else gpu_problem(gate.provider, gate.gpu_uuids) or "no GPU found"
        self.warm = WarmModels(self)  # declared models: what the pool processes hold, eviction
        self.exclusive = ExclusiveFollower(self)  # an exclusive batch job, while one has every GPU
        self.model_queues = ModelQueues(self)  # affinity: the model queues this worker consumes
        # told the id of each message this worker gave up unrun (sent on, handed back): the run-once guard
        self.handed_on: list[Callable[[str], None]] = []
        self.hand_back = HandBack(self)  # the held line back to its queues, unrun

    # --- messages -------------------------------------------------------------------

    def offer(self, message: Any, proceed: Callable[[], Any], give_back: Callable[[], Any],
              since: float | None = None) -> None:
        """A message arrived (at *since*, monotonic; now if None): run it, hold it, send it where
        it can run, or refuse it."""
        try:
            requirement = requirement_of(message)
        except Exception as exc:  # whatever a message holds, it must not take the worker down
            refuse(self.consumer, self.registry.client, message, exc)
            self.counters["refused"] += 1
            return
        if message.headers.get(REQUIREMENT_HEADER) is None:
            # a producer that stamps nothing (plain Celery, another version): the task registered here says
            task = self.consumer.app.tasks.get(message.headers.get("task"))
            requirement = getattr(task, "requirement", None) or requirement
        self.arrived(message)
        held = Held(message, proceed, requirement, time.monotonic() if since is None else since, give_back)
        if self.exclusive.holds_back(message, requirement):  # fetched as the batch began: back to its queue
            self.hand_back.messages([held], "an exclusive batch has every GPU")
            return
        # a GPU task that arrives while every slot runs (prefetch grows by held and scheduled messages and
        # shrinks only eventually) waits for one: admitted now, it would be reserved for what the pool cannot
        # start, against models the running task may be evicting; with a lookahead, the line picks
        if self.held or self.blocked() or self.policy.lookahead or (
                requirement.needs_gpu and self._free_slots() <= 0):
            self._hold(held, backfill=True)
            return
        if not self._try(held):
            self._hold(held)

    def defer(self, message: Any) -> None:
        """Celery will schedule *message*: it stays unacknowledged here, unreserved until ``due``."""
        with self.lock:
            if not (is_revoked(message.headers.get("id")) or expired(message.headers.get("expires"))):
                self.deferred[str(message.delivery_tag)] = time.monotonic()  # else Celery discards it at once
        self.arrived(message)

    def arrived(self, message: Any) -> None:
        """This worker holds *message*: said to the registry now, not at the next announcement
        a second away, so a kill meanwhile does not leave it to the visibility timeout."""
        with self.lock:
            self.tags[message.headers.get("id")] = str(message.delivery_tag)
        self.registry.holding(f"{self.node}#{self.incarnation}", str(message.delivery_tag))
        self.changed.set()

    def due(self, message: Any, start: Callable[[], Any], give_back: Callable[[], Any]) -> bool:
        """Celery hands *message*'s request to the pool; a deferred one is offered now (``True``)."""
        with self.lock:
            arrived = self.deferred.pop(str(message.delivery_tag), None)
        if arrived is None:
            return False
        self.offer(message, start, give_back, since=arrived)  # Redis's visibility timeout counts from arrival
        return True

    def _try(self, held: Held) -> bool:
        """Decide for *held*; ``False`` means it must wait."""
        message = held.message
        task_id = message.headers.get("id")
        if is_revoked(task_id) or expired(message.headers.get("expires")):
            held.proceed()  # revoked or expired while held: Celery discards it, with nothing reserved
            return True
        if task_id in self.reservations:  # a retry delivered before its last run let go: that release would free it
            decision: Decision = Wait(f"the previous run of {task_id} still holds its reservation")
        else:  # by incarnation: a restart under the same name must not adopt its predecessor's reservation
            decision = self.warm.decide(held, f"{self.node}#{self.incarnation}/{task_id}")
        if isinstance(decision, Wait):
            self.counters["waits"] += 1
            self.reasons["waiting"] = decision.reason
            return False
        if isinstance(decision, Reroute):
            reroute(self, message, decision, held.requirement)
            return True
        message.headers[GPUS_HEADER] = list(decision.gpus)
        queue = (message.delivery_info or {}).get("routing_key")
        with self.lock:
            self.reservations[task_id] = Running(decision, time.monotonic(), queue, message.headers.get("task"))
            self.activity.started(decision.gpus, task_id, message.headers.get("task"))
        self.counters["admitted"] += 1
        held.proceed()
        return True

    def _hold(self, held: Held, backfill: bool = False) -> None:
        self.held.append(held)
        self.counters["held"] += 1
        if "unhealthy" in self.reasons:  # a message that arrives as the GPU fails goes to a healthy one
            self.hand_back.line("this worker's GPUs are unhealthy")
        if backfill and not self.blocked():  # behind a waiting head, it may start in a gap now
            start_held(self.held, self._try, self.policy, self._free_slots(), self._forecast)
        self._update_intake()

    def _free_slots(self) -> int:
        return self.consumer.pool.num_processes - len(self.reservations)

    def _forecast(self) -> Forecast[Held] | None:
        """For the head's predicted start (``core.forecast``), when the policy asks: a GPU reading."""
        if not self.held or not self.policy.predict_head_start:
            return None
        with self.lock:
            running = dict(self.reservations)
        return forecast_of(self.gate, running, self.run_times, self.consumer.pool.num_processes)

    def finished(self, task_id: str) -> None:
        """A request ended (any thread): release its reservation and let the line move."""
        with self.lock:
            entry = self.reservations.pop(task_id, None)
            self.tags.pop(task_id, None)
            if entry is not None:
                self.activity.ended(entry.admitted.gpus, task_id)
        if entry is not None:
            self.gate.ledger.release(entry.admitted.reservation, entry.admitted.pools)
            self.counters["released"] += 1
            self._observe_runtime(entry)
            if self.held:
                self.consumer.call_soon(self.retry_held)

    def _observe_runtime(self, entry: Running) -> None:
        """Learned run times (per queue and per task): for the rebalancer's expected work, and
        the held line's predicted start of its head.

        Measured here, from hand-over to the pool until the request ends, because
        Celery's own ``time_start`` is wall-clock in prefork and monotonic elsewhere.
        """
        seconds = time.monotonic() - entry.since
        with self.lock:
            for key in (f"q:{entry.queue}", f"t:{entry.task}"):
                self.runtimes[f"{key}:sum"] += seconds
                self.runtimes[f"{key}:count"] += 1
            self.run_times.observe(entry.task, seconds)

    def retry_held(self) -> None:
        if not self.blocked():
            start_held(self.held, self._try, self.policy, self._free_slots(), self._forecast)
        if not self.held:
            self.reasons.pop("waiting", None)
        self._update_intake()

    def gave_up(self, task_id: str) -> None:
        """*task_id*'s message left this worker unrun: whoever takes it next may run it."""
        for hook in self.handed_on:
            hook(task_id)

    # --- intake ---------------------------------------------------------------------

    def blocked(self) -> bool:
        doubt = self.lease.doubt()
        if doubt is None:
            self.reasons.pop("lease", None)
        else:
            self.reasons["lease"] = doubt
        return any(kind not in NOT_PAUSING for kind in self.reasons)

    def _update_intake(self) -> None:
        # a held message fills a prefetch slot: see the one behind it (and keep ``lookahead`` more)
        self.intake.hold_slots(max(len(self.held), self.policy.lookahead))
        if self.intake.update(not takes_more(self.held, self.policy, self._forecast) or self.blocked(),
                              self.reasons):
            self.counters["pauses"] += 1

    # --- periodic work --------------------------------------------------------------

    def tick(self) -> None:
        """Every half second on the event loop: health, pressure, the held line, leftovers."""
        self.check()
        self.exclusive.tick()
        self.hand_back.before_redelivery()
        self.retry_held()
        self._reconcile()

    def check(self) -> None:
        """GPU health on GPU workers, host pressure on CPU workers; pauses or resumes intake."""
        if self.no_gpu is not None:
            refuse_gpu_queues(self)
        if self.gate.known:
            unhealthy = [g for g in self.gate.gpus() if not g.healthy]
            if unhealthy and len(unhealthy) == len(self.gate.known):
                if "unhealthy" not in self.reasons:
                    self.reasons["unhealthy"] = ", ".join(f"GPU {g.index} ({g.uuid})" for g in unhealthy)
                    self.hand_back.line("this worker's GPUs are unhealthy")
            else:
                self.reasons.pop("unhealthy", None)
            subscribe_need_queues(self)
            self.model_queues.update()
        elif pressure := host_pressure(self.gate.config, self.gate.cpu_threads):
            self.reasons["pressure"] = pressure
        else:
            self.reasons.pop("pressure", None)
        self._update_intake()

    def _reconcile(self) -> None:
        live = live_request_ids()
        cutoff = time.monotonic() - RECONCILE_AFTER_S
        with self.lock:
            stale = [tid for tid, run in self.reservations.items() if run.since < cutoff and tid not in live]
        for task_id in stale:
            self.finished(task_id)

    def held_tags(self) -> list[str]:
        with self.lock:
            return list(self.tags.values())

    def held_reservations(self) -> dict[str, dict[str, int]]:
        """Reservation id → pool → amount, for every task admitted and not yet finished, and every
        model a pool process holds warm."""
        with self.lock:
            tasks = {run.admitted.reservation: run.admitted.claims() for run in self.reservations.values()}
        return self.warm.held(tasks)

    def release_all(self) -> None:
        """At shutdown: give every reservation back now rather than at its expiry."""
        with self.lock:
            entries = list(self.reservations.values())
            self.reservations.clear()
        for run in entries:
            self.gate.ledger.release(run.admitted.reservation, run.admitted.pools)
        self.warm.release_all()

"""Discrete-event simulation of a GPU fleet, around taskmesh's real decision code.

Real — the code a deployment runs, called as it calls it:

- the producer's ``SubmitPolicy.prepare`` (``infeasible``, ``fits``, ``need_queue``)
  against a real worker registry in Redis (every simulated worker announces itself);
- ``Requirement.from_header`` on every delivery, and ``Gate.decide`` on it: one gate
  per GPU worker (``taskmesh worker`` runs one worker per GPU), each reading its host's
  ``SimulatedProvider``, whose used memory follows the tasks running there;
- the Redis ``Ledger``; or ``MemoryLedger``, which is *not* the real ledger but its
  rules re-implemented in memory and checked answer for answer against it;
- the held-line policy (``core.held_line.start_from_line``, ``LinePolicy.takes_more``),
  as the admission controller calls it: which held messages start on every arrival and
  release, and when intake pauses (the worker's ``admission.backfill`` settings), with
  the head's predicted start (``core.forecast``) from the run times each worker learned
  of its own tasks, per task class, as the controller learns them per task name;
- the rebalance policy, when ``probe`` is set (``rebalance_probe.py``): every
  rebalance interval of simulated time, the rebalancer's own view builders and its
  ``alerts``, ``scaling_hints`` and ``saturated`` run on a snapshot of the fleet. It
  only observes: nothing it says is carried out, so the schedule does not change.

Re-modelled here — simulation code standing in for the real thing:

- the admission controller's plumbing around that policy (``worker/controller.py`` is not
  run): a message the gate answers ``Wait`` joins the worker's held line, which the policy
  runs again on each of the worker's releases (the real worker also every half second,
  which changes nothing here: memory only frees on a release); a ``Reroute`` republishes
  the message to its need queue (registered in the real registry) and every worker whose
  GPU ``can_serve`` it subscribes. Reservation refresh, health checks and periodic
  announces are left out;
- Celery and Redis: FIFO lists (one priority), BRPOP serving the worker blocked
  longest, one message per free pool slot (prefetch multiplier 1, late ack), round
  robin over a worker's queues, the prefetch grown by one per held message as the worker's
  ``Intake`` does;
- time. Durations are fixed: tasks sharing a GPU do not slow each other (memory is
  modelled, compute contention is not). Decisions take no simulated time; their real
  cost is measured on the wall clock.
"""

from __future__ import annotations

import collections
import dataclasses
import heapq
import math
import time
from collections.abc import Sequence
from typing import Any

from benchmarks.rebalance_probe import RebalanceProbe
from benchmarks.sim_worker import HOST_MEMORY_MIB, HostMemory, Outcome, Worker
from benchmarks.synthetic import Host
from taskmesh.app.celery_app import create_app
from taskmesh.core.claims import LedgerLike
from taskmesh.core.errors import InfeasibleRequirement
from taskmesh.core.forecast import Forecast
from taskmesh.core.gate import Admitted, Gate, Reroute, Wait
from taskmesh.core.held_line import LinePolicy, predicts, start_from_line
from taskmesh.core.need_queues import can_serve
from taskmesh.core.profiles import QUEUES
from taskmesh.core.records import GpuRecord, WorkerRecord
from taskmesh.core.requirements import Requirement
from taskmesh.hardware.simulated import SimulatedProvider
from taskmesh.state.queues import QueueDepth
from taskmesh.state.registry import Registry


class Simulation:
    """One run: a fleet, a batch of jobs sent at time 0, a ledger; ``run()`` plays it to the end."""

    def __init__(self, fleet: Sequence[Host], reqs: Sequence[Requirement], jobs: Sequence[tuple[int, float]],
                 ledger: LedgerLike, broker: str, slots: int = 4, record: bool = False,
                 producer_calls_per_class: int | None = None, policy: LinePolicy | None = None) -> None:
        self.reqs, self.jobs, self.record = reqs, jobs, record
        self.producer_calls = producer_calls_per_class
        self.headers = [r.to_header() for r in reqs]
        self.app = create_app("benchmarks.simulate", broker=broker)
        self.config = self.app.taskmesh_config.admission
        self.policy = policy or self.config.line_policy()
        self.sizes = [r.vram_mib * r.gpus if r.vram_mib is not None and not r.exclusive else math.inf for r in reqs]
        self.priorities = [r.priority or 0 for r in reqs]
        self.arrived: dict[int, float] = {}  # job → when its worker took it, while held
        self.head_since: dict[int, float] = {}  # job → since when it heads its worker's held line
        self.now = 0.0
        self.events: list[tuple[float, int, Worker, int, Admitted, int]] = []
        self.queues: dict[str, collections.deque[int]] = collections.defaultdict(collections.deque)
        self.waiters: dict[str, collections.deque[tuple[int, Worker]]] = collections.defaultdict(collections.deque)
        self.delivered: dict[int, str] = {}  # job → the queue it was taken from, while unacknowledged
        self.in_flight: collections.Counter[str] = collections.Counter()
        self.runtime_sum: collections.Counter[str] = collections.Counter()  # by queue, as workers report them
        self.runtime_count: collections.Counter[str] = collections.Counter()
        self.probe: RebalanceProbe | None = None  # set one to run the real rebalance policy as time passes
        self.out = Outcome()
        self.workers = self._start_workers(fleet, ledger, slots)

    def _start_workers(self, fleet: Sequence[Host], ledger: LedgerLike, slots: int) -> list[Worker]:
        registry, workers = Registry(self.app.redis()), []
        for host in fleet:
            memory = HostMemory()
            provider = SimulatedProvider(host.spec, host=host.name, control=memory)
            for gpu in provider.snapshot():
                gate = Gate(host=host.name, provider=provider, ledger=ledger, config=self.config,
                            gpu_uuids=(gpu.uuid,), cpu_threads=64, memory_total_mib=HOST_MEMORY_MIB)
                record = WorkerRecord(
                    node=f"gpu{gpu.index}@{host.name}", incarnation="sim", host=host.name, queues=("gpu",),
                    cpu_threads=64, memory_total_mib=HOST_MEMORY_MIB,
                    gpus=(GpuRecord(gpu.uuid, gpu.index, gpu.name, gpu.memory_total_mib, gpu.compute_capability),))
                workers.append(Worker(record, gate, gpu, memory, slots))
                registry.announce(record)
        return workers

    def run(self) -> Outcome:
        self._submit_all()
        self._subscribe(Registry(self.app.redis()).need_queues())
        for worker in self.workers:
            self._pull(worker)
        while self.events:
            if self.probe is not None and self.probe.next_at < self.events[0][0]:
                self.probe.observe(*self.snapshot(self.probe.next_at))
                continue
            self.now, _, worker, job, admitted, amount = heapq.heappop(self.events)
            self._finish(worker, job, admitted, amount)
        self.out.makespan_s = self.now
        return self.out

    def _submit_all(self) -> None:
        """Everything is sent at time 0, through the producer's real checks.

        The producer's answer depends only on the requirement and the registry, which
        does not change here; with ``producer_calls_per_class`` set, each class is sent
        through ``prepare`` that many times (and timed), then its answer is reused.
        """
        policy = self.app.submit_policy()
        clock = time.perf_counter_ns
        answers: dict[int, str | None] = {}
        calls: collections.Counter[int] = collections.Counter()
        for job, (cls, _) in enumerate(self.jobs):
            if self.producer_calls is None or calls[cls] < self.producer_calls:
                calls[cls] += 1
                options: dict[str, Any] = {}
                start = clock()
                try:
                    policy.prepare(f"sim.{cls}", self.reqs[cls], options)
                    answers[cls] = options.get("queue", "gpu")
                except InfeasibleRequirement:
                    answers[cls] = None
                self.out.produce_us.append((clock() - start) / 1000)
            queue = answers[cls]
            if queue is None:
                self.out.rejected += 1
            else:
                self._push(queue, job)

    def _subscribe(self, need_queues: dict[str, Requirement]) -> None:
        """Each worker consumes the need queues its GPU can run, as the admission controller does."""
        margin = self.config.safety_margin_mib
        for name, need in need_queues.items():
            for worker in self.workers:
                if name not in worker.queues and can_serve([worker.gpu], need, margin):
                    worker.queues.append(name)
                    worker.record = dataclasses.replace(worker.record, queues=tuple(sorted(worker.queues)))
                    if worker.blocked:
                        self.waiters[name].append((worker.token, worker))

    def snapshot(self, now: float) -> tuple[list[WorkerRecord], dict[str, dict[str, Any]], dict[str, QueueDepth],
                                            dict[str, float]]:
        """What the live rebalancer would read from Redis at *now*: worker records, the states
        their controllers announce (a held message pauses intake), queue depths over the
        profile queues and need queues, and mean run times by queue."""
        records = [w.record for w in self.workers]
        states = {w.node: {"pool": {"implementation": "prefork", "size": w.slots}, "running": len(w.runs),
                           "held": len(w.line), "paused": not self._takes_more(w)} for w in self.workers}
        names = list(QUEUES) + sorted(q for q in self.queues if q not in QUEUES)
        depths = {}
        for name in names:
            waiting = len(self.queues.get(name, ()))
            # Every task is sent at time 0 and a rerouted one keeps its enqueue stamp: the oldest waited `now`.
            depths[name] = QueueDepth(name, waiting, self.in_flight[name], now if waiting else None, {0: waiting})
        runtimes = {q: total / self.runtime_count[q] for q, total in self.runtime_sum.items()}
        return records, states, depths, runtimes

    # --- what Redis and Celery's consumer do ---------------------------------------

    def _push(self, queue: str, job: int) -> None:
        waiting = self.waiters[queue]
        while waiting:
            token, worker = waiting.popleft()
            if worker.blocked and worker.token == token:
                worker.blocked = False
                self._offer(worker, job, queue)
                self._pull(worker)
                return
        self.queues[queue].append(job)

    def _pull(self, worker: Worker) -> None:
        """Take messages while a pool slot is free and intake is open; else block on BRPOP.

        The prefetch is the pool's slots plus the held messages, and both running and held
        messages are unacknowledged: a message is taken while fewer than *slots* run."""
        ahead = self.policy.lookahead  # the worker's prefetch keeps that many beyond its slots
        while (len(worker.runs) < worker.slots or len(worker.line) < ahead) and self._takes_more(worker):
            for position, queue in enumerate(worker.queues):
                if self.queues[queue]:
                    worker.queues.append(worker.queues.pop(position))  # kombu's round robin
                    self._offer(worker, self.queues[queue].popleft(), queue)
                    break
            else:
                worker.blocked, worker.token = True, worker.token + 1
                for queue in worker.queues:
                    self.waiters[queue].append((worker.token, worker))
                return

    # --- what the admission controller does -----------------------------------------

    def _takes_more(self, worker: Worker) -> bool:
        line = worker.line
        waited = self.now - self.arrived[line[0]] if line else 0.0
        predicted = waited >= self.policy.max_head_wait_s and predicts(
            self.policy, self._forecast(worker), self.sizes[self.jobs[line[0]][0]], self.now)
        return self.policy.takes_more(len(line), waited, predicted)

    def _offer(self, worker: Worker, job: int, queue: str) -> None:
        """Deliver *job* from *queue* to the worker's controller: it starts, joins the held line
        (and the policy runs on the line, as it may be backfilled at once), or is rerouted."""
        self.delivered[job] = queue
        self.in_flight[queue] += 1
        if not worker.line:  # with a lookahead it joins the line, which picks what starts
            if not self.policy.lookahead and self._decide(worker, job):
                return
            worker.held_since = self.now
        self.arrived[job] = self.now
        worker.line.append(job)
        if len(worker.line) > 1 or self.policy.lookahead:
            self._run_line(worker)
        elif job not in self.head_since:
            self.head_since[job] = self.now

    def _run_line(self, worker: Worker) -> None:
        """The held-line policy, as the controller runs it on an arrival and on each release."""
        start_from_line(worker.line, lambda j: self._decide(worker, j), self.now, self.policy,
                        since=self.arrived.__getitem__, size=lambda j: self.sizes[self.jobs[j][0]],
                        priority=lambda j: self.priorities[self.jobs[j][0]], slots=worker.slots - len(worker.runs),
                        forecast=lambda: self._forecast(worker))
        if not worker.line:
            self.out.held_s += self.now - worker.held_since
            worker.held_since = -1.0
        elif worker.line[0] not in self.head_since:
            self.head_since[worker.line[0]] = self.now

    def _forecast(self, worker: Worker) -> Forecast[int]:
        """What the worker's controller knows of its GPU: the room the gate sees, and when its
        running tasks and held messages are expected to end, from the run times it learned."""
        free = worker.gpu.memory_total_mib - self.config.safety_margin_mib - worker.memory.used[worker.gpu.index]
        mean = worker.learned.mean
        running = [(None if (m := mean(cls)) is None else start + m, mib) for start, cls, mib in worker.runs.values()]
        return Forecast(free, running, lambda j: mean(self.jobs[j][0]), worker.slots)

    def _decide(self, worker: Worker, job: int) -> bool:
        """The gate's decision for *job*; ``False``: it must wait."""
        start = time.perf_counter_ns()
        requirement = Requirement.from_header(self.headers[self.jobs[job][0]])
        decision = worker.gate.decide(requirement, f"{worker.node}/{job}")
        self.out.decide_us.append((time.perf_counter_ns() - start) / 1000)
        if not isinstance(decision, Wait):
            self.arrived.pop(job, None)  # it leaves the line (a rerouted one may be held by another worker next)
        if isinstance(decision, Admitted):
            self._start(worker, job, requirement, decision)
            return True
        if isinstance(decision, Reroute):
            self.out.reroutes += 1
            self.in_flight[self.delivered.pop(job)] -= 1  # the controller acks it once republished
            if decision.queue not in self.queues:
                Registry(self.app.redis()).register_need_queue(decision.queue, requirement)
                self._subscribe({decision.queue: requirement})
            self._push(decision.queue, job)
            return True
        self.out.waits += 1
        return False

    def _start(self, worker: Worker, job: int, requirement: Requirement, admitted: Admitted) -> None:
        margin = self.config.safety_margin_mib
        whole = requirement.exclusive or requirement.vram_mib is None
        amount = worker.gpu.memory_total_mib - margin if whole else requirement.vram_mib
        duration = self.jobs[job][1]
        if (headed := self.head_since.pop(job, None)) is not None:
            self.out.longest_head_wait_s = max(self.out.longest_head_wait_s, self.now - headed)
        worker.runs[job] = (self.now, self.jobs[job][0], amount)
        worker.memory.used[worker.gpu.index] += amount
        self.out.admitted += 1
        self.out.reserved_area += amount * duration
        self.out.busy_slot_s += duration
        heapq.heappush(self.events, (self.now + duration, job, worker, job, admitted, amount))
        if self.record:
            self.out.schedule.append((job, worker.gpu.uuid, self.now, self.now + duration, amount))

    def _finish(self, worker: Worker, job: int, admitted: Admitted, amount: int) -> None:
        start = time.perf_counter_ns()
        worker.gate.ledger.release(admitted.reservation, admitted.pools)
        self.out.release_us.append((time.perf_counter_ns() - start) / 1000)
        queue = self.delivered.pop(job)
        self.in_flight[queue] -= 1
        self.runtime_sum[queue] += self.jobs[job][1]
        self.runtime_count[queue] += 1
        worker.learned.observe(*self.jobs[job])
        del worker.runs[job]
        worker.memory.used[worker.gpu.index] -= amount
        if worker.line:  # the controller runs its line on every release
            self._run_line(worker)
        self._pull(worker)

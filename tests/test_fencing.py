"""Fencing: a worker is presumed dead only when Redis, never a host clock, has not seen it
renew its lease for ``dead_after_s``; a worker that finds its lease lost says so and
re-creates the reservations of what it runs; a reservation lost from the ledger comes back.

Real redis-server, real ``celery worker`` processes, faults by pid (SIGSTOP/SIGCONT of a
worker and its pool child: a VM stall). kombu itself would deliver a message again only
after the visibility timeout, an hour here (derived from the test tasks' time limits), far
beyond these tests: a second run can only come from taskmesh's dead-worker recovery.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from taskmesh.core.claims import Claim, gpu_pool
from taskmesh.core.config import load_config
from taskmesh.core.errors import ConfigError
from taskmesh.core.records import WorkerRecord
from taskmesh.hardware.simulated import SimulatedProvider
from taskmesh.state.keys import INFLIGHT, LEASES, LEDGER_PREFIX, UNACKED, WORKERS
from taskmesh.state.ledger import Ledger
from taskmesh.state.memory_ledger import MemoryLedger
from taskmesh.state.registry import Registry, Renewal
from taskmesh.worker.lease import Lease

from .conftest import queue_depth, wait_for_workers, wait_until
from .test_admission import GIB, stats

HOST = socket.gethostname()
APP = "tests.apps.gpu_app"
SPEC = "2x24GiB"
UUIDS = [g.uuid for g in SimulatedProvider(SPEC).snapshot()]
TTL_S = 6  # reservation_ttl_s in the stall tests: the lease must outlive two 2 s heartbeats


class Worker:
    def __init__(self, proc: subprocess.Popen[bytes], node: str, log: Path) -> None:
        self.proc, self.node, self.log = proc, node, log

    def output(self) -> str:
        return self.log.read_text(errors="replace")


def start_worker(processes, app, tmp_path: Path, name: str, gpu: int, slots: int = 1, **env: str) -> Worker:
    """One ``celery worker`` on queue ``gpu``, pinned to one simulated GPU, its log in a file."""
    node = f"{name}@{HOST}"
    log = tmp_path / f"{name}.log"
    argv = [sys.executable, "-m", "celery", "-A", APP, "worker", "-Q", "gpu", "-P", "prefork", "-c", str(slots),
            "-n", node, "--loglevel", "WARNING"]
    with log.open("wb") as out:
        proc = processes.start(argv, {"TASKMESH_SIMULATE_GPUS": SPEC, "CUDA_VISIBLE_DEVICES": UUIDS[gpu], **env},
                               stdout=out, stderr=subprocess.STDOUT)
    wait_for_workers(app, [node])
    return Worker(proc, node, log)


@contextlib.contextmanager
def stopped(worker: Worker) -> Iterator[None]:
    """SIGSTOP the worker and its pool children (the whole worker stalls), SIGCONT on leaving."""
    main = psutil.Process(worker.proc.pid)
    pids = [main.pid, *(child.pid for child in main.children(recursive=True))]
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        for pid in reversed(pids):
            os.kill(pid, signal.SIGCONT)


def runs(broker, app) -> list[str]:
    return [r.decode() for r in broker.lrange(app.RUNS, 0, -1)]


def holder(broker, workers: list[Worker]) -> Worker:
    """The worker whose announced in-flight set holds a message (only one task is sent)."""
    for worker in workers:
        if any(broker.smembers(key) for key in broker.scan_iter(f"{INFLIGHT}{worker.node}#*")):
            return worker
    raise LookupError


def stall_the_running_worker(gpu_app, broker, processes, tmp_path, dead_after_s: float, stall_s: float):
    """Two workers on queue ``gpu``; the one that takes a 20 s task stalls for *stall_s* (> TTL_S),
    a few seconds into it (``time.sleep`` keeps counting while stopped: the task must outlast the stall)."""
    env = {"TASKMESH_RESERVATION_TTL_S": str(TTL_S), "TASKMESH_DEAD_AFTER_S": str(dead_after_s)}
    workers = [start_worker(processes, gpu_app.app, tmp_path, f"fence-{n}", n, **env) for n in (0, 1)]
    result = gpu_app.ten_gib.delay(20.0, label="long")
    wait_until(lambda: runs(broker, gpu_app) == [result.id], "the task started")
    wait_until(lambda: any(broker.scan_iter(f"{INFLIGHT}*")), "its worker announced that it holds it", 10)
    runner = holder(broker, workers)
    spare = next(w for w in workers if w is not runner)
    pool = gpu_pool(UUIDS[workers.index(runner)])
    ledger = Ledger(broker)
    assert ledger.used([pool])[pool] == 10 * GIB
    with stopped(runner):
        time.sleep(TTL_S + 1.5)
        assert ledger.used([pool])[pool] == 0  # its reservation expired meanwhile
        time.sleep(stall_s - TTL_S - 1.5)
    return result, runner, spare, pool, ledger


@pytest.mark.slow
def test_a_worker_stalled_past_the_ttl_but_not_dead_after_s_keeps_its_task_and_its_memory(
        gpu_app, broker, processes, tmp_path):
    result, runner, spare, pool, ledger = stall_the_running_worker(
        gpu_app, broker, processes, tmp_path, dead_after_s=18, stall_s=10)
    # within a few heartbeats it re-creates the reservation of what it still runs
    wait_until(lambda: ledger.used([pool])[pool] == 10 * GIB, "the running task's 10 GiB reserved again", 10)
    assert result.get(timeout=60)["label"] == "long"
    assert runs(broker, gpu_app) == [result.id]  # not given to the idle spare (the next test shows it could be)
    wait_until(lambda: broker.hlen(UNACKED) == 0, "the task acknowledged (it acks after its result)", 10)
    assert queue_depth(broker, "gpu") == 0
    assert Registry(broker).counters().get("duplicates_detected", 0) == 0
    assert "lease was lost" in runner.output() and "not renewed for" in runner.output()
    assert gpu_app.ten_gib.delay(0.1, label="next").get(timeout=60)["label"] == "next"


@pytest.mark.slow
def test_with_dead_after_s_below_the_stall_the_task_runs_twice_and_the_duplicate_is_reported(
        gpu_app, broker, processes, tmp_path):
    result, runner, spare, pool, ledger = stall_the_running_worker(
        gpu_app, broker, processes, tmp_path, dead_after_s=8, stall_s=14)
    wait_until(lambda: runs(broker, gpu_app) == [result.id, result.id], "the spare ran it again", 30)
    wait_until(lambda: Registry(broker).counters().get("duplicates_detected") == 1, "the duplicate counted", 30)
    assert f"task {result.id}" in runner.output() and "may run twice" in runner.output()
    assert "presumed dead" in runner.output()
    assert result.get(timeout=60)["label"] == "long"
    # both copies end; the stale one's acknowledgement must not remove the other's unacked entry
    wait_until(lambda: broker.hlen(UNACKED) == 0, "both copies acknowledged", 60)
    assert queue_depth(broker, "gpu") == 0
    assert stats(gpu_app.app, runner.node)["counters"]["duplicates_detected"] == 1


@pytest.mark.slow
def test_a_worker_back_from_a_stall_of_its_own_presumes_no_one_dead_until_it_has_held_its_lease_for_dead_after_s(
        gpu_app, broker, processes, tmp_path):
    """Both workers stall past dead_after_s (as when Redis is unreachable for all of them); the idle
    one comes back first and sees the other's lease 10 s old, but must not give its task away."""
    env = {"TASKMESH_RESERVATION_TTL_S": str(TTL_S), "TASKMESH_DEAD_AFTER_S": "8"}
    workers = [start_worker(processes, gpu_app.app, tmp_path, f"fence-{n}", n, **env) for n in (0, 1)]
    result = gpu_app.ten_gib.delay(20.0, label="long")
    wait_until(lambda: runs(broker, gpu_app) == [result.id], "the task started")
    wait_until(lambda: any(broker.scan_iter(f"{INFLIGHT}*")), "its worker announced that it holds it", 10)
    runner = holder(broker, workers)
    spare = next(w for w in workers if w is not runner)
    with stopped(runner):
        with stopped(spare):
            time.sleep(10)
        registry = Registry(broker, dead_after_s=8)
        wait_until(lambda: any(registry.is_alive(r) for r in registry.workers() if r.node == spare.node),
                   "the spare renewed its lease", 10)
        assert registry.dead_holding_messages()  # the runner looks dead to Redis
        time.sleep(4)  # the spare beats twice meanwhile, holding its own lease for less than dead_after_s
    assert result.get(timeout=60)["label"] == "long"
    assert runs(broker, gpu_app) == [result.id]
    assert "lease was lost" in spare.output() and "presumed dead" not in spare.output()


@pytest.mark.slow
def test_a_worker_whose_clock_is_ten_minutes_behind_is_not_presumed_dead(gpu_app, broker, processes, tmp_path):
    """Skew is simulated: the worker's ``time.time()`` reads 600 s behind (tests/apps/gpu_app.py);
    the system clock and Redis's are left alone."""
    skewed = start_worker(processes, gpu_app.app, tmp_path, "skewed", 0, TASKMESH_TEST_CLOCK_SKEW_S="-600")
    result = gpu_app.ten_gib.delay(15.0, label="long")
    wait_until(lambda: runs(broker, gpu_app) == [result.id], "the task started")
    wait_until(lambda: any(broker.scan_iter(f"{INFLIGHT}{skewed.node}#*")), "it announced that it holds it", 10)
    spare = start_worker(processes, gpu_app.app, tmp_path, "spare", 1)
    registry = Registry(broker)
    beats = set()
    while not result.ready():  # the spare's heartbeat looks for dead workers on every beat
        beats.add(registry.states().get(spare.node, {}).get("updated"))
        assert all(registry.is_alive(r) for r in registry.workers() if r.node == skewed.node)
        time.sleep(0.2)
    assert len(beats - {None}) >= 3
    assert result.get(timeout=10)["label"] == "long"
    assert runs(broker, gpu_app) == [result.id]
    wait_until(lambda: broker.hlen(UNACKED) == 0, "the task acknowledged (it acks after its result)", 10)
    assert queue_depth(broker, "gpu") == 0


@pytest.mark.slow
def test_a_task_that_arrives_as_a_stalled_worker_wakes_waits_for_room_its_running_task_still_holds(
        gpu_app, broker, processes, tmp_path):
    """After a stall past the TTL the ledger has lost the running task's 10 GiB; a 20 GiB task
    read on waking must wait for them to be written back, and then for room."""
    worker = start_worker(processes, gpu_app.app, tmp_path, "fence-intake", 0, slots=2,
                          TASKMESH_RESERVATION_TTL_S=str(TTL_S))
    pool = gpu_pool(UUIDS[0])
    ledger = Ledger(broker)
    first = gpu_app.ten_gib.delay(20.0, label="first")
    wait_until(lambda: ledger.used([pool])[pool] == 10 * GIB and runs(broker, gpu_app), "the 10 GiB task runs")
    with stopped(worker):
        time.sleep(TTL_S + 1.5)
        assert ledger.used([pool])[pool] == 0  # expired: a 20 GiB task would fit the ledger now
        second = gpu_app.twenty_gib.delay(0.1, label="second")  # the worker's first read on waking
    wait_until(lambda: stats(gpu_app.app, worker.node)["held"] == 1 or len(runs(broker, gpu_app)) > 1,
               "the 20 GiB task held or started", 30)
    assert runs(broker, gpu_app) == [first.id]  # not started beside the 10 GiB one: 30 GiB on a 24 GiB GPU
    assert ledger.used([pool])[pool] == 10 * GIB
    ended = first.get(timeout=60)["ended"]
    assert second.get(timeout=60)["started"] >= ended


def test_liveness_is_timed_by_redis_and_never_by_the_announced_clock(broker):
    registry = Registry(broker, alive_s=15, dead_after_s=60)
    record = WorkerRecord("w@far", "1", "far", ("gpu",), (), 8, 1024)
    registry.announce(record, ["tag-1"])
    stale = WorkerRecord.from_json(broker.hget(WORKERS, record.key)).__dict__ | {"last_seen": 0.0}
    broker.hset(WORKERS, record.key, WorkerRecord(**stale).to_json())  # a host clock at 1970
    (seen,) = registry.workers()
    assert seen.last_seen == 0.0 and registry.is_alive(seen) and not registry.dead_holding_messages()

    now = float(broker.time()[0])
    broker.zadd(LEASES, {record.key: now - 30})  # not renewed for 30 s by Redis's clock
    (seen,) = registry.workers()
    assert not registry.is_alive(seen) and not registry.dead_holding_messages()  # not yet presumed dead
    broker.zadd(LEASES, {record.key: now - 90})
    assert registry.dead_holding_messages() == {record.key: ["tag-1"]}


def test_a_worker_doubts_its_lease_before_redis_could_expire_it_and_until_it_has_recovered():
    lease = Lease(ttl_s=0.3)
    assert lease.doubt() is None and lease.renewed(Renewal(None, {})) == (None, {})  # a first renewal
    lease.holds(time.monotonic())
    assert lease.doubt() is None
    time.sleep(0.4)  # by its own clock, counted from before the renewal was sent: before Redis's
    assert "not renewed within reservation_ttl_s (0.3s)" in lease.doubt()
    assert lease.held_for() >= 0.4
    lost, given = lease.renewed(Renewal(0.45, {"tag-1": "task-1"}))
    assert "not renewed for 0.5s by Redis's clock" in lost and "presumed dead, 1 of its messages" in lost
    assert given == {"tag-1": "task-1"}
    lease.holds(time.monotonic() - 1.0)
    assert lease.doubt() is not None  # recovered, but that renewal is already older than the TTL
    assert 1.0 <= lease.held_for() < 1.3  # a lost lease starts its holding over
    assert lease.renewed(Renewal(0.1, {"tag-1": "task-1"})) == (None, {})  # given back once, dealt with once
    lease.holds(time.monotonic())
    assert lease.doubt() is None
    lost, _ = lease.renewed(Renewal(None, {}))
    assert "Redis no longer had it" in lost and lease.doubt() == lost  # until the heartbeat has recovered


@pytest.mark.parametrize("ledger_kind", ["redis", "memory"])
def test_refresh_recreates_lost_reservations_even_past_capacity(ledger_kind, broker):
    ledger = Ledger(broker) if ledger_kind == "redis" else MemoryLedger()
    pool = gpu_pool("GPU-lost")
    assert ledger.reserve("running", [Claim(pool, 10 * GIB, 16 * GIB)]) is None
    assert ledger.refresh({"running": {pool: 10 * GIB}}) == []
    if ledger_kind == "redis":
        broker.delete(f"{LEDGER_PREFIX}{pool}", f"{LEDGER_PREFIX}{pool}:expiry")
    else:
        ledger.pools.clear()
    assert ledger.reserve("newcomer", [Claim(pool, 10 * GIB, 16 * GIB)]) is None  # let in while it was lost
    assert ledger.refresh({"running": {pool: 10 * GIB}}) == ["running"]
    assert ledger.used([pool]) == {pool: 20 * GIB}  # over capacity: both are really in use
    assert ledger.reserve("next", [Claim(pool, 1, 16 * GIB)]) is not None  # nothing more until one ends


@pytest.mark.slow
def test_reservations_deleted_from_the_ledger_come_back_and_a_task_that_no_longer_fits_waits(
        gpu_app, broker, processes, tmp_path):
    worker = start_worker(processes, gpu_app.app, tmp_path, "ledger", 0, slots=2)  # the pool would take both
    pool = gpu_pool(UUIDS[0])
    ledger = Ledger(broker)
    running = gpu_app.ten_gib.delay(20.0, label="long")
    wait_until(lambda: ledger.used([pool])[pool] == 10 * GIB and runs(broker, gpu_app), "the 10 GiB task runs")
    broker.delete(f"{LEDGER_PREFIX}{pool}", f"{LEDGER_PREFIX}{pool}:expiry")  # as a Redis restart would
    assert ledger.used([pool])[pool] == 0
    wait_until(lambda: ledger.used([pool])[pool] == 10 * GIB, "10 GiB reserved again within a few heartbeats", 10)
    wait_until(lambda: "re-created" in worker.output(), "the worker says it re-created the reservation", 10)
    second = gpu_app.twenty_gib.delay(0.1, label="second")
    wait_until(lambda: stats(gpu_app.app, worker.node)["held"] == 1, "the 20 GiB task is held", 30)
    assert "ledger" in stats(gpu_app.app, worker.node)["reasons"]["waiting"]
    assert runs(broker, gpu_app) == [running.id] and not second.ready()
    first = running.get(timeout=60)
    assert second.get(timeout=60)["started"] >= first["ended"]


@pytest.mark.slow
def test_a_worker_whose_lease_vanished_says_so_and_re_creates_what_it_runs(gpu_app, broker, processes, tmp_path):
    worker = start_worker(processes, gpu_app.app, tmp_path, "vanish", 0)
    pool = gpu_pool(UUIDS[0])
    ledger = Ledger(broker)
    running = gpu_app.ten_gib.delay(12.0, label="long")
    wait_until(lambda: ledger.used([pool])[pool] == 10 * GIB and runs(broker, gpu_app), "the 10 GiB task runs")
    broker.delete(*broker.scan_iter("taskmesh:*"))  # Redis lost all of taskmesh's state
    wait_until(lambda: ledger.used([pool])[pool] == 10 * GIB, "10 GiB reserved again", 10)
    registry = Registry(broker)
    wait_until(lambda: any(registry.is_alive(r) for r in registry.workers() if r.node == worker.node),
               "the worker announced itself again", 10)
    assert "lease was lost" in worker.output() and "Redis no longer had it" in worker.output()
    assert running.get(timeout=60)["label"] == "long"
    assert runs(broker, gpu_app) == [running.id]


def test_dead_after_s_defaults_to_60_has_an_override_and_must_exceed_the_ttl(tmp_path, monkeypatch):
    config = tmp_path / "hw.yaml"
    config.write_text("admission: {reservation_ttl_s: 15}\n")
    assert load_config(config).admission.dead_after_s == 60.0
    monkeypatch.setenv("TASKMESH_DEAD_AFTER_S", "120")
    assert load_config(config).admission.dead_after_s == 120.0
    monkeypatch.setenv("TASKMESH_DEAD_AFTER_S", "10")
    with pytest.raises(ConfigError, match=r"admission.dead_after_s: 10 s is not above admission.reservation_ttl_s"):
        load_config(config)
    monkeypatch.setenv("TASKMESH_DEAD_AFTER_S", "0")
    with pytest.raises(ConfigError, match="TASKMESH_DEAD_AFTER_S"):
        load_config(config)

"""The chaos scenarios: real redis-server, real ``taskmesh worker`` processes with simulated
GPUs, faults injected by pid; each returns its counted figures.

``tests/chaos/test_chaos.py`` runs them at CI size and asserts the promises of the README's
"Guarantees"; ``scripts/chaos`` runs them at full size and writes RELIABILITY.md.
Every scenario ends with the GPU ledger check: reserved MiB equal to what the GPU tasks
still running declared (0 once all have ended).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Any

import psutil
from kombu.exceptions import OperationalError

from taskmesh.hardware.simulated import SimulationControl
from taskmesh.state.keys import UNACKED
from taskmesh.state.once import once_key
from taskmesh.state.registry import Registry
from tests.apps import chaos_app
from tests.chaos.rig import FAST_FENCING, Rig, count_runs, unpooled
from tests.conftest import ROOT, AofRedis, wait_until
from tests.test_admission import GIB, stats
from tests.test_reconnect import drop_connections

ONCE = [t.name.rsplit(".", 1)[-1] for t in chaos_app.MIXTURE if t.name.endswith("_once")]
#: A once=True run whose process is killed this soon after its body's last effect may not have
#: marked itself done yet (one Redis round trip, longer on a busy gevent worker: ``app.once``).
MARK_WINDOW_S = 1.0


def _ledger(rig: Rig) -> dict[str, int]:
    return {"ledger_reserved_mib": rig.ledger_reserved_mib(), "running_vram_mib": rig.running_vram_mib()}


def _settle(rig: Rig, ids: list[str], timeout: float) -> None:
    """Every task ran to its end and no copy is left to deliver: a second run would have shown by now."""
    ended = lambda: {e["id"] for e in rig.records(chaos_app.ENDS)} >= set(ids)  # noqa: E731
    wait_until(lambda: ended() and rig.settled() and not rig.running(), "every task ran and nothing is left",
               timeout, seen=lambda: f"({len(set(ids) - {e['id'] for e in rig.records(chaos_app.ENDS)})} not run)")
    time.sleep(1.0)


def kills(rig: Rig, tasks: int, kills: int, seed: int = 1, seconds: tuple[float, float] = (0.2, 1.0)) -> dict[str, Any]:
    """(a) *tasks* over all four profiles (half once=True), each lasting a random time within
    *seconds*; *kills* SIGKILLs, each of a worker process or of a pool child that is running
    a task, at random, while they run."""
    rng = random.Random(seed)
    supervisor = rig.taskmesh_worker("all", "all", nodes=4, TASKMESH_SIMULATE_GPUS="1x24GiB",
                                     TASKMESH_GPU_SLOTS="2", **FAST_FENCING)
    sent = [chaos_app.MIXTURE[i % len(chaos_app.MIXTURE)].apply_async((rng.uniform(*seconds),)).id
            for i in range(tasks)]
    names = {task_id: chaos_app.MIXTURE[i % len(chaos_app.MIXTURE)].name.rsplit(".", 1)[-1]
             for i, task_id in enumerate(sent)}
    faults: list[dict[str, Any]] = []
    for _ in range(kills):
        time.sleep(rng.uniform(0.5, 2.0))
        wait_until(lambda: rig.running(), "a task is running to hit", 120)
        victim = rng.choice(rig.running())
        mains = {p.pid for p in psutil.Process(supervisor.pid).children()}
        kind = "worker" if victim["pid"] in mains or rng.random() < 0.5 else "pool child"
        pid = victim["pid"] if kind == "pool child" or victim["pid"] in mains else psutil.Process(victim["pid"]).ppid()
        pids = {pid} | ({c.pid for c in psutil.Process(pid).children()} if kind == "worker" else set())
        hit = [r["id"] for r in rig.running() if r["pid"] in pids]
        os.kill(pid, signal.SIGKILL)
        faults.append({"kind": kind, "node": victim["node"], "pid": pid, "pids": sorted(pids), "t": time.time(),
                       "hit": hit})
    try:
        _settle(rig, sent, timeout=300)
    except AssertionError:  # counted below: which tasks never ran
        pass
    ends = rig.records(chaos_app.ENDS)
    for fault in faults:  # recovered: every task it hit ran to its end again
        done = [e["t"] for e in ends if e["id"] in fault["hit"] and e["t"] > fault["t"]]
        fault["recovered_s"] = round(max(done) - fault["t"], 1) if done else None
    recovery = [f["recovered_s"] for f in faults if f["recovered_s"] is not None]
    lost = set(sent) - {e["id"] for e in ends}
    started = {s["id"] for s in rig.records(chaos_app.STARTS)}
    return {**count_runs(rig, sent, ONCE), "duplicates_once_unmarked": _unmarked(ends, faults, names),
            "kills": len(faults),
            "kills_of_workers": sum(f["kind"] == "worker" for f in faults),
            "tasks_hit": sum(len(f["hit"]) for f in faults),
            "recovery_max_s": max(recovery, default=None), "faults": faults,
            "lost_tasks": sorted(names[t] for t in lost),
            # a lost once=True task's claim says how far it got: none (no worker's strategy saw it),
            # running:<holder> (claimed, then its worker died), returned/done (marked done, never run: a bug)
            "lost_once_claims": sorted((rig.client.get(once_key(t, 0)) or b"none").decode().split(":")[0]
                                       for t in lost if names[t] in ONCE),
            "lost_after_they_started": sum(t in started for t in lost),
            "unacked_left": rig.client.hlen(UNACKED), **_ledger(rig)}


def _unmarked(ends: list[dict[str, Any]], faults: list[dict[str, Any]], names: dict[str, str]) -> int:
    """Further runs of ``once=True`` tasks whose first run's process was killed within
    ``MARK_WINDOW_S`` after that run's end: the one window the README's guarantee leaves open,
    between a body's last effect and the mark that its run is done. Any other is a bug."""
    runs: dict[str, list[dict[str, Any]]] = {}
    for end in ends:
        runs.setdefault(end["id"], []).append(end)
    count = 0
    for task_id, task_runs in runs.items():
        first = min(task_runs, key=lambda e: e["t"])
        if len(task_runs) > 1 and names.get(task_id) in ONCE and any(
                first["pid"] in f["pids"] and 0 <= f["t"] - first["t"] < MARK_WINDOW_S for f in faults):
            count += len(task_runs) - 1
    return count


def redis_restarts(directory, logdir, tasks: int, restarts: int, down_s: float = 2.0) -> dict[str, Any]:
    """(b) A producer sends *tasks* while the Redis (append-only file, as ``taskmesh up``
    runs it) is SIGKILLed and started again *restarts* times. A worker that kombu's channel
    close ends as Redis goes ("Unrecoverable error" in ``restore_unacked``, plain kombu) is
    restarted by ``taskmesh worker``; what it ran comes back after ``dead_after_s``."""
    server = AofRedis(directory)
    try:
        with Rig(server.url, logdir) as rig:
            rig.taskmesh_worker("gpu", "gpu", nodes=1, TASKMESH_SIMULATE_GPUS="1x24GiB", TASKMESH_GPU_SLOTS="2",
                                **FAST_FENCING)
            sent, refused, slowest = [], [], [0.0]
            done = threading.Event()

            def produce() -> None:
                for i in range(tasks):
                    task = (chaos_app.gpu_job, chaos_app.gpu_once)[i % 2]
                    started = time.monotonic()
                    try:
                        sent.append(task.apply_async((0.05,)).id)
                    except OperationalError as exc:  # the documented error while the broker is down
                        refused.append(f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}")
                    slowest[0] = max(slowest[0], time.monotonic() - started)
                    time.sleep(0.05)
                done.set()

            producer = threading.Thread(target=produce, daemon=True)
            producer.start()
            for n in range(restarts):
                share = tasks // (restarts + 1) * (n + 1)
                wait_until(lambda share=share: len(sent) >= share or done.is_set(), "the producer sent its share", 120)
                server.restart(down_s)
            producer.join(300)
            ran = lambda: {e["id"] for e in rig.records(chaos_app.ENDS)} >= set(sent)  # noqa: E731
            try:
                wait_until(lambda: ran() and not rig.running(), "every task whose send returned ran", 180)
                time.sleep(float(FAST_FENCING["TASKMESH_DEAD_AFTER_S"]) + 4)  # a dead incarnation's are back
            except AssertionError:  # counted below
                pass
            started = {s["id"] for s in rig.records(chaos_app.STARTS)}
            missing = set(sent) - {e["id"] for e in rig.records(chaos_app.ENDS)}
            return {**count_runs(rig, sent, ["gpu_once"]), "attempted": tasks, "restarts": restarts,
                    "down_s": down_s, "send_refused": len(refused), "refusals": sorted(set(refused))[:3],
                    "slowest_send_s": round(slowest[0], 1), "unacked_left": rig.client.hlen(UNACKED),
                    "lost_after_they_started": len(missing & started),
                    **_ledger(rig)}
    finally:
        server.stop()


def connection_drops(rig: Rig, tasks: int, drops: int) -> dict[str, Any]:
    """(c) *tasks* 10 GiB tasks held (20 GiB of the GPU used by another process) while the
    worker's broker connections are CLIENT KILLed *drops* times; then the memory frees."""
    rig.taskmesh_worker("gpu", "gpu", nodes=1, TASKMESH_SIMULATE_GPUS="1x24GiB", TASKMESH_GPU_SLOTS="2")
    node = f"gpu0@{socket.gethostname()}"
    memory = SimulationControl(rig.client)
    memory.use(0, 20 * GIB)
    sent = [chaos_app.gpu_big.apply_async((0.1,)).id for _ in range(tasks)]
    held = 0
    for _ in range(drops):
        wait_until(lambda: rig.nodes() and stats(rig.app.app, node)["held"] >= 1, "a task is held", 120)
        held = max(held, stats(rig.app.app, node)["held"])
        pid = rig.app.app.control.inspect(destination=[node], timeout=5).stats()[node]["pid"]
        assert drop_connections(rig.client, pid), "no connection to drop"
        time.sleep(2.0)
    wait_until(lambda: rig.nodes() and stats(rig.app.app, node)["held"] >= 1, "held again after the drops", 120)
    memory.use(0, 0)
    _settle(rig, sent, timeout=300)
    return {**count_runs(rig, sent), "drops": drops, "most_held": held, **_ledger(rig)}


def stalls(rig: Rig, rounds: int, dead_after_s: float, stall_s: float) -> dict[str, Any]:
    """(d) *rounds* times, the worker running a 20 s GPU task is SIGSTOPped for *stall_s*
    (past its reservation TTL), then SIGCONTed; tests/test_fencing.py holds the fault itself."""
    from tests.apps import gpu_app
    from tests.conftest import Processes, bind
    from tests.test_fencing import stall_the_running_worker

    gpu_app = bind(unpooled(gpu_app), rig.url)
    os.environ["TASKMESH_BROKER_URL"] = rig.url  # the workers test_fencing starts take it from the environment
    figures = {"rounds": rounds, "dead_after_s": dead_after_s, "stall_s": stall_s, "duplicates": 0,
               "duplicates_detected": 0, "ledger_after_stall_ok": 0, "lost": 0}
    for n in range(rounds):
        rig.client.flushdb()
        procs = Processes()
        (rig.logdir / f"stall-{n}").mkdir(parents=True, exist_ok=True)
        try:
            result, runner, _, pool, ledger = stall_the_running_worker(
                gpu_app, rig.client, procs, rig.logdir / f"stall-{n}", dead_after_s, stall_s)
            # back from the stall it writes its running task's 10 GiB back within a few heartbeats
            wait_until(lambda ledger=ledger, pool=pool: ledger.used([pool])[pool] >= 10 * GIB,
                       "the reservation written back", 10)
            figures["ledger_after_stall_ok"] += ledger.used([pool])[pool] == 10 * GIB
            result.get(timeout=120)
            wait_until(lambda: not rig.client.hlen(UNACKED), "every copy acknowledged", 120)
            runs = [r.decode() for r in rig.client.lrange(gpu_app.RUNS, 0, -1)]
            figures["duplicates"] += runs.count(result.id) - 1
            figures["lost"] += not runs
            figures["duplicates_detected"] += Registry(rig.client).counters().get("duplicates_detected", 0)
            figures["ledger_reserved_mib"] = sum(ledger.used([pool]).values())
        finally:
            procs.stop_all()
    return figures


def long_task(rig: Rig, seconds: float = 6.0) -> dict[str, Any]:
    """(e) Two tasks with ``time_limit=7200`` run; their deliveries are backdated in kombu's
    ``unacked_index`` as if they had run for longer than kombu's default visibility timeout
    (3,600 s), one of them also past taskmesh's derived one (2 x 7200 + 300 s); then kombu's
    scan for expired deliveries (``QoS.restore_visible``, which a worker runs at start and every
    100 s) runs, with the visibility timeout the app derived, and puts back what expired."""
    rig.celery_worker("long", "cpu_intensive", "-c", "2")
    rig.app.app.finalize()  # derives the visibility timeout from the tasks' time limits, as in the worker
    timeout = rig.app.app.conf.broker_transport_options["visibility_timeout"]
    sent = [chaos_app.long_job.apply_async((seconds,)).id for _ in range(2)]
    wait_until(lambda: len(rig.running()) == 2 and rig.client.hlen(UNACKED) == 2, "both run", 60)
    tags = {json.loads(raw)[0]["headers"]["id"]: tag for tag, raw in rig.client.hgetall(UNACKED).items()}
    now = time.time()
    rig.client.zadd("unacked_index", {tags[sent[0]]: now - 3600 - 60, tags[sent[1]]: now - timeout - 60})
    with rig.app.app.connection_for_write() as conn:  # kombu's own expiry scan, as a worker runs it
        # the scan is skipped while another holds kombu's unacked mutex (a worker's own scan): until it ran
        wait_until(lambda: conn.default_channel.qos.restore_visible(num=10, interval=1)
                   or not rig.client.hexists(UNACKED, tags[sent[1]]), "kombu's scan to put the expired one back", 30)
    # The control's copy put back may be taken by the worker under the same delivery tag while its
    # first run still runs; that run's ack then clears the entry, and nothing is left unacknowledged
    # while the copy waits for a slot: "settled" comes before the second run. Wait for that run
    # (the other task was put back by nothing, so by then a second run of it would have ended too).
    with contextlib.suppress(AssertionError):  # counted below
        wait_until(lambda: count_runs(rig, sent[1:])["duplicates"] >= 1, "the control's second run", 60)
    _settle(rig, sent, timeout=120)
    under = count_runs(rig, sent[:1])
    past = count_runs(rig, sent[1:])
    return {"visibility_timeout_s": timeout, "tasks": 1, "duplicates": under["duplicates"], "lost": under["lost"],
            "control_past_timeout_duplicates": past["duplicates"], **_ledger(rig)}


def poison(rig: Rig, each: int, neighbours: int) -> dict[str, Any]:
    """(f) *each* tasks that SIGKILL their own pool process and *each* that always raise, among
    *neighbours* ordinary tasks on the same worker."""
    rig.taskmesh_worker("cpu", "cpu_intensive", nodes=1, TASKMESH_CPU_CONCURRENCY="1")
    killers = [chaos_app.kills_itself.delay().id for _ in range(each)]
    raisers = [chaos_app.always_raises.delay().id for _ in range(each)]
    plain = [chaos_app.cpu_job.delay(0.05).id for _ in range(neighbours)]
    _settle(rig, plain, timeout=300)
    wait_until(lambda: len(dead_letters(rig)) >= 2 * each, "every poison task dead-lettered", 300)
    wait_until(rig.settled, "nothing left to deliver", 60)
    time.sleep(2.0)  # a further retry would have started by now (default_retry_delay=0)
    starts = [s["id"] for s in rig.records(chaos_app.STARTS)]
    listed = {entry["id"] for entry in dead_letters(rig)}
    return {"poison_tasks": 2 * each, "runs_per_killer": sorted({starts.count(t) for t in killers}),
            "runs_per_raiser": sorted({starts.count(t) for t in raisers}),
            "dead_lettered_listed": len(listed & set(killers + raisers)),
            "dead_lettered_metric": Registry(rig.client).counters().get("dead_lettered", 0),
            "neighbours": count_runs(rig, plain), **_ledger(rig)}


def dead_letters(rig: Rig) -> list[dict[str, Any]]:
    """What ``taskmesh dlq list --json`` says, as a user would ask."""
    out = subprocess.run([sys.executable, "-m", "taskmesh", "-A", "tests.apps.chaos_app", "dlq", "list", "--json"],
                         cwd=ROOT, capture_output=True, text=True, timeout=60,
                         env={**os.environ, "TASKMESH_BROKER_URL": rig.url})
    return json.loads(out.stdout or "[]")

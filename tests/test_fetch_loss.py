"""A message taken off its queue by a worker that dies before reading it (issue 11).

kombu's Redis transport took a message with ``BRPOP``: Redis removes it from the list when
it writes the reply, and the worker recorded it as unacknowledged only after reading that
reply, in a second round trip. A worker SIGKILLed in between took the message with it (the
chaos suite's last loss, nearly always on the busy gevent worker). Here the window is held
open for certain: the worker is SIGSTOPped while its connection waits in Redis, the task is
sent (Redis answers the stopped worker), and the worker is SIGKILLed once Redis has nothing
left to answer it. The message must still be in Redis, and another worker must run it.

A worker that reads the reply of its fetch and is killed before it announces what it holds
is the same loss one step later, for dead-worker recovery: the fetch that records the
message also adds it to the worker's in-flight set, inside the script.
"""

from __future__ import annotations

import os
import signal
import threading

import psutil
import pytest

from taskmesh.state.keys import INFLIGHT, UNACKED
from tests.apps import chaos_app
from tests.chaos.rig import FAST_FENCING, Rig, count_runs
from tests.conftest import queue_depth, wait_until


@pytest.fixture
def rig(broker_url, tmp_path):
    with Rig(broker_url, tmp_path / "logs") as rig:
        yield rig


def blocked_connections(rig: Rig, pid: int) -> list[dict]:
    """Redis's clients that are *pid*'s connections and wait in a blocking command now."""
    ports = {c.laddr.port for c in psutil.Process(pid).net_connections(kind="tcp") if c.laddr}
    return [c for c in rig.client.client_list()
            if int(c["addr"].rsplit(":", 1)[1]) in ports and "b" in c["flags"]]


def stop_while_waiting_in_redis(rig: Rig, pid: int) -> None:
    """SIGSTOP *pid* at a moment its consumer connection is blocked in Redis (checked after the stop)."""
    while True:
        wait_until(lambda: blocked_connections(rig, pid), "the worker waits in Redis for a message", 60)
        os.kill(pid, signal.SIGSTOP)
        if blocked_connections(rig, pid):
            return
        os.kill(pid, signal.SIGCONT)


@pytest.mark.slow
def test_a_message_redis_hands_a_worker_killed_before_reading_it_is_run_by_another(rig):
    doomed = rig.celery_worker("doomed", "cpu_light", "-P", "gevent", "-c", "10", **FAST_FENCING)
    stop_while_waiting_in_redis(rig, doomed.pid)
    result = chaos_app.io_job.delay(0.1)
    # Redis answers what the stopped worker waited in: nothing of it is pending in Redis any more
    wait_until(lambda: not blocked_connections(rig, doomed.pid), "Redis answered the stopped worker", 30)
    os.killpg(doomed.pid, signal.SIGKILL)
    doomed.wait(30)
    queued, unacked = queue_depth(rig.client, "cpu_light"), rig.client.hlen(UNACKED)
    assert queued + unacked == 1, (
        f"the message left Redis with the killed worker: {queued} queued, {unacked} unacknowledged")
    rig.celery_worker("survivor", "cpu_light", "-P", "gevent", "-c", "10", **FAST_FENCING)
    assert result.get(timeout=90) == result.id
    wait_until(lambda: not rig.client.hlen(UNACKED), "nothing left unacknowledged")
    assert count_runs(rig, [result.id])["duplicates"] == 0


def test_a_worker_is_recorded_as_holding_a_message_by_the_script_that_takes_it(rig):
    rig.celery_worker("holder", "cpu_light", "-P", "gevent", "-c", "10")
    first_writer: dict[str, str] = {}  # delivery tag → client type of the first SADD of it to the set

    def watch() -> None:
        with rig.client.monitor() as monitor:
            ready.set()
            for seen in monitor.listen():
                if seen["command"] == "ECHO monitor-done":
                    return
                if seen["command"].startswith(f"SADD {INFLIGHT}holder@chaos#"):  # the announcement's come later
                    for tag in seen["command"].split()[2:]:
                        first_writer.setdefault(tag, seen["client_type"])

    ready = threading.Event()
    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    ready.wait(10)
    results = [chaos_app.io_job.delay(0.1) for _ in range(3)]
    assert [r.get(timeout=60) for r in results] == [r.id for r in results]
    rig.client.echo("monitor-done")
    watcher.join(10)
    assert len(first_writer) == 3 and set(first_writer.values()) == {"lua"}, first_writer  # not a round trip

"""Acknowledgements on a gevent worker with more slots than Redis connections.

kombu's Redis channel gives its commands a pool of at most ``max_connections`` (10 unless a
transport option says otherwise) and fails a command that finds all in use: on a gevent or
threads worker with more slots, tasks that end together each acknowledge at once, and the
ones that found no connection logged "Couldn't ack ... Too many connections", stayed
unacknowledged and ran again after the visibility timeout (seen in the overhead benchmark,
100 greenlets, 5 of 5,000 no-op tasks). The worker's channel waits for a free connection
instead. Here the pool has two connections, so tasks that end together must share them,
and the orphan sweep's ``dead_after_s`` is short, so a message left unacknowledged (its task
ended, no worker holds it) is delivered again and runs a second time within the test."""

from __future__ import annotations

import collections
import socket
import time

import pytest

from taskmesh.state.keys import UNACKED

from .apps.e2e_app import RUNS
from .conftest import wait_for_workers, wait_until

APP = "tests.apps.e2e_app"
DEAD_AFTER_S = 8  # an unacknowledged message no worker holds is delivered again this long after


@pytest.mark.slow
def test_tasks_that_end_together_each_acknowledge_their_message_through_a_small_pool_and_run_once(
        e2e, processes, broker, tmp_path):
    node = f"wide@{socket.gethostname()}"
    log = tmp_path / "worker.log"
    processes.celery_worker(APP, "-Q", "cpu_light", "-P", "gevent", "-c", "50", "-n", node,
                            "--without-mingle", "--without-gossip", "--logfile", str(log),
                            env={"TASKMESH_TEST_MAX_CONNECTIONS": "2",
                                 "TASKMESH_RESERVATION_TTL_S": "6", "TASKMESH_DEAD_AFTER_S": str(DEAD_AFTER_S)})
    wait_for_workers(e2e.app, [node])
    results = [e2e.counted.delay(1.0, label=i) for i in range(50)]
    for result in results:
        result.get(timeout=60)
    ended = time.monotonic()
    # the sweep runs every dead_after_s / 4 and delivers a tag unheld for dead_after_s: wait that
    # out (and the second run) before counting runs
    time.sleep(max(0.0, ended + 2 * DEAD_AFTER_S + 4 - time.monotonic()))
    runs = collections.Counter(broker.lrange(RUNS, 0, -1))
    assert len(runs) == 50 and set(runs.values()) == {1}, \
        f"ran more than once: {[k for k, n in runs.items() if n > 1]}; log: {log.read_text()[-1500:]}"
    wait_until(lambda: not broker.hlen(UNACKED), "every message acknowledged", 10,
               seen=lambda: f"{broker.hlen(UNACKED)} unacknowledged; log: {log.read_text()[-1500:]}")
    assert "Couldn't ack" not in log.read_text()

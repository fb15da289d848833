"""The chaos scenarios at CI size (``scripts/chaos`` runs them at full size and writes
RELIABILITY.md): nothing lost, no once=True task run twice, the GPU ledger back to what runs.
The stall scenario (d) runs in CI as tests/test_fencing.py's two single cases."""

from __future__ import annotations

import os
import signal
import sys

import pytest

from taskmesh.core.records import WorkerRecord
from taskmesh.state.keys import INFLIGHT, UNACKED
from taskmesh.state.registry import Registry
from tests.apps import chaos_app
from tests.chaos import scenarios
from tests.chaos.rig import FAST_FENCING, Rig, count_runs
from tests.chaos.run import SIZES
from tests.conftest import ROOT, queue_depth, wait_until


@pytest.fixture
def rig(broker_url, tmp_path):
    with Rig(broker_url, tmp_path / "logs") as rig:
        yield rig


@pytest.mark.slow
def test_random_sigkills_of_workers_and_pool_children_lose_nothing_and_run_no_once_task_twice(rig):
    figures = scenarios.kills(rig, **SIZES["kills"]["ci"])
    # the one window left open: killed after its body's last effect, before the run marked itself done
    assert figures["duplicates_once"] == figures["duplicates_once_unmarked"]
    # nothing lost: not at a fetch (worker/fetch.py records what it pops in the same step), and
    # nothing stranded in kombu's unacked hash waiting for the visibility timeout
    assert figures["lost"] == figures["unacked_left"] == 0
    assert figures["tasks_hit"] >= 2  # each kill hit a running task
    assert figures["ledger_reserved_mib"] == figures["running_vram_mib"] == 0


@pytest.mark.slow
def test_two_redis_restarts_lose_no_task_whose_send_returned(tmp_path):
    figures = scenarios.redis_restarts(tmp_path / "redis", tmp_path / "logs", **SIZES["redis_restarts"]["ci"])
    # each send returned or raised kombu's OperationalError (any other error would end the producer early)
    assert figures["sent"] + figures["send_refused"] == figures["attempted"]
    assert figures["lost"] == 0 and figures["duplicates_once"] == 0
    assert figures["ledger_reserved_mib"] == 0


@pytest.mark.slow
def test_connection_drops_while_tasks_are_held_run_each_once(rig):
    figures = scenarios.connection_drops(rig, **SIZES["connection_drops"]["ci"])
    assert figures["lost"] == 0 and figures["duplicates"] == 0
    assert figures["ledger_reserved_mib"] == figures["running_vram_mib"] == 0


@pytest.mark.slow
def test_a_task_running_past_kombus_visibility_timeout_is_not_delivered_again(rig):
    figures = scenarios.long_task(rig, **SIZES["long_task"]["ci"])
    assert figures["visibility_timeout_s"] == 2 * 7200 + 300
    assert figures["duplicates"] == 0 and figures["lost"] == 0
    assert figures["control_past_timeout_duplicates"] == 1  # one past even that is: the check can see it


@pytest.mark.slow
def test_poison_tasks_are_bounded_then_dead_lettered_and_counted_and_neighbours_run(rig):
    figures = scenarios.poison(rig, **SIZES["poison"]["ci"])
    assert figures["runs_per_killer"] == [3] and figures["runs_per_raiser"] == [1]  # max_retries=2, no retry
    assert figures["dead_lettered_listed"] == figures["dead_lettered_metric"] == 2
    assert figures["neighbours"]["lost"] == 0 and figures["neighbours"]["duplicates"] == 0
    assert figures["ledger_reserved_mib"] == 0


@pytest.mark.slow
def test_a_worker_killed_within_a_second_of_taking_a_message_hands_it_back(rig):
    """Found by the kill scenario: a worker announced what it holds up to a second after a
    message arrived, so one SIGKILLed in that second left the message to Redis's visibility
    timeout (an hour). B arrives as A ends, before the next announcement; the worker (and its
    pool) is killed as B starts; a second worker must run B again after dead_after_s."""
    doomed = rig.celery_worker("doomed", "cpu_intensive", "-c", "1", **FAST_FENCING)
    first = chaos_app.cpu_job.delay(0.3)
    second = chaos_app.cpu_job.delay(8.0)
    wait_until(lambda: any(s["id"] == second.id for s in rig.records(chaos_app.STARTS)), "B started", 60)
    os.killpg(doomed.pid, signal.SIGKILL)
    rig.celery_worker("survivor", "cpu_intensive", "-c", "1", **FAST_FENCING)
    assert first.get(timeout=10) == first.id
    assert second.get(timeout=90) == second.id  # delivered again by the survivor, not after an hour


@pytest.mark.slow
def test_a_message_taken_by_a_process_killed_before_it_said_so_is_delivered_again(rig):
    """Found by the kill scenario at full size (an io_once task never ran, left in kombu's
    unacked hash): a worker SIGKILLed between kombu recording a delivery and the worker saying
    it holds it. A bare kombu consumer, SIGKILLed after it took the message, is that worker
    at its worst: the message is unacknowledged and held by nobody. A taskmesh worker must
    deliver it again after dead_after_s (8 s here), not after the visibility timeout (hours)."""
    result = chaos_app.cpu_job.delay(0.1)
    taker = rig.procs.start("taker", [sys.executable, "-c", TAKER, rig.url, "cpu_intensive"], {})
    wait_until(lambda: rig.client.hlen(UNACKED) == 1 and not queue_depth(rig.client, "cpu_intensive"),
               "the message was taken, unacknowledged", 60)
    os.kill(taker.pid, signal.SIGKILL)
    rig.celery_worker("survivor", "cpu_intensive", "-c", "1", **FAST_FENCING)
    assert result.get(timeout=90) == result.id
    wait_until(lambda: not rig.client.hlen(UNACKED), "nothing left unacknowledged")
    assert count_runs(rig, [result.id])["duplicates"] == 0


TAKER = """
import sys, time
from kombu import Connection
with Connection(sys.argv[1]) as conn:
    assert conn.default_channel.basic_get(sys.argv[2]) is not None  # recorded in kombu's unacked hash
    time.sleep(600)
"""


def test_every_bad_input_case_in_reliability_md_names_a_test_that_exists():
    from tests.chaos.report import CAMPAIGN

    assert len(CAMPAIGN) >= 30
    for _, test_id in CAMPAIGN:
        path, _, name = test_id.partition("::")
        function, _, case = name.partition("[")
        text = (ROOT / path).read_text()
        assert f"def {function}(" in text, test_id
        assert not case or f'"{case[:-1]}"' in text, test_id


def test_a_tag_added_while_the_heartbeat_announces_stays_in_the_in_flight_set(broker):
    """Found by the kill scenario at full size (2 of 2,000 tasks never ran): the heartbeat read
    what the worker held, a message arrived and its tag was added, then the announcement
    replaced the set with what it had read; a kill before the next beat left that message to
    the visibility timeout. Replacing the set (no ``gone``, as before) shows the loss."""
    registry = Registry(broker)
    record = WorkerRecord("w@host", "1", "host", ("gpu",), (), 8, 1024)
    key = f"{INFLIGHT}{record.key}"
    registry.holding(record.key, "t1")
    added, snapshot = registry.take_added(), ["t1"]  # the heartbeat reads what the worker holds
    registry.holding(record.key, "t2")  # a message arrives meanwhile
    registry.announce(record, snapshot, gone=added - set(snapshot))
    assert broker.smembers(key) == {b"t1", b"t2"}
    added = registry.take_added()
    registry.announce(record, [], gone={"t1"} | added)  # both ended before the next beat
    assert broker.smembers(key) == set()
    registry.holding(record.key, "t3")
    registry.announce(record, snapshot)  # the old way: the set replaced by the snapshot
    assert broker.smembers(key) == {b"t1"}  # t3 wiped: its message would wait for the visibility timeout

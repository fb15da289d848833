"""The chaos scenarios at CI size (``scripts/chaos`` runs them at full size and writes
RELIABILITY.md): nothing lost, no once=True task run twice, the GPU ledger back to what runs."""

from __future__ import annotations

import os
import signal

import pytest

from tests.apps import chaos_app
from tests.chaos import scenarios
from tests.chaos.rig import FAST_FENCING, Rig
from tests.test_reconnect import wait_until


@pytest.fixture
def rig(broker_url, tmp_path):
    with Rig(broker_url, tmp_path / "logs") as rig:
        yield rig


@pytest.mark.slow
def test_random_sigkills_of_workers_and_pool_children_lose_nothing_and_run_no_once_task_twice(rig):
    figures = scenarios.kills(rig, tasks=120, kills=2, seed=11)
    print(figures)
    assert figures["lost"] == 0 and figures["duplicates_once"] == 0
    assert figures["tasks_hit"] >= 2  # each kill hit a running task
    assert figures["ledger_reserved_mib"] == figures["running_vram_mib"] == 0


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

"""A GPU task gives its reserved memory back as soon as it ends, however it ends: success,
failure, retry, revoke (running or still waiting), expiry while waiting and a hard time limit.

Each run here ends within a few tenths of a second of its admission, and the ledger must
be back at 0 within ``PROMPT_S`` of the ending being visible to the client. The controller's
reconcile frees only reservations admitted more than ``RECONCILE_AFTER_S`` ago, and
reservations expire only after the 15 s TTL, so neither can hide a missed release by then.
"""

from __future__ import annotations

import time

import pytest
from celery.exceptions import TimeLimitExceeded

from taskmesh.core.claims import gpu_pool
from taskmesh.hardware.simulated import SimulatedProvider, SimulationControl
from taskmesh.state.ledger import Ledger
from taskmesh.worker.controller import RECONCILE_AFTER_S

from .conftest import wait_until
from .test_admission import GIB, start_gpus, stats

GPU = "1x16GiB"  # room for one 10 GiB task: a leaked reservation would block the next
SLOTS = "2"  # two pool slots, so the ledger alone keeps a second 10 GiB task waiting
PROMPT_S = RECONCILE_AFTER_S / 2



def succeeds(app, broker, node) -> int:
    app.ten_gib.delay(0.1).get(timeout=60)
    return 1


def fails(app, broker, node) -> int:
    with pytest.raises(RuntimeError, match="on purpose"):
        app.fails.delay().get(timeout=60)
    return 1


def retries_once(app, broker, node) -> int:
    sent = time.time()
    result = app.retries_once.delay()
    second = result.get(timeout=60)
    assert second["label"] == 1 and second["reserved_mib"] == 10 * GIB  # admitted again, not unreserved
    assert second["started"] - sent < RECONCILE_AFTER_S  # let in by the first run's release, not the reconcile
    assert [r.decode() for r in broker.lrange(app.RUNS, 0, -1)] == [result.id, result.id]
    return 2  # the retried run was admitted again


def hits_its_time_limit(app, broker, node) -> int:
    with pytest.raises(TimeLimitExceeded):
        app.overruns.delay().get(timeout=60)
    return 1


def is_revoked_while_running(app, broker, node) -> int:
    result = app.ten_gib.delay(30.0)
    wait_until(lambda: broker.llen(app.RUNS), "the task started")
    result.revoke(terminate=True)
    wait_until(lambda: result.state == "REVOKED", "the task was revoked")
    return 1


def is_revoked_while_waiting(app, broker, node) -> int:
    memory = SimulationControl(broker)
    memory.use(0, 8 * GIB)  # another process's memory: the task waits, held by the worker
    waiting = app.ten_gib.delay(0.1)
    wait_until(lambda: stats(app.app, node)["held"] == 1, "the task was held")
    waiting.revoke()
    wait_until(lambda: waiting.state == "REVOKED", "the held task was revoked")
    # it leaves the line while the memory is still taken (a lone held task no longer pauses intake: backfill)
    wait_until(lambda: stats(app.app, node)["held"] == 0, "the revoked task left the line", timeout=20)
    memory.use(0, 0)
    assert not broker.llen(app.RUNS)
    return 0  # never admitted: nothing was reserved for it


def expires_while_waiting(app, broker, node) -> int:
    memory = SimulationControl(broker)
    memory.use(0, 8 * GIB)
    waiting = app.ten_gib.apply_async((0.1,), expires=3)
    wait_until(lambda: stats(app.app, node)["held"] == 1, "the task was held")
    wait_until(lambda: waiting.state == "REVOKED", "the held task expired", timeout=30)
    wait_until(lambda: stats(app.app, node)["held"] == 0, "the expired task left the line", timeout=20)
    memory.use(0, 0)
    assert not broker.llen(app.RUNS)
    return 0


@pytest.mark.parametrize("ending", [succeeds, fails, retries_once, hits_its_time_limit,
                                    is_revoked_while_running, is_revoked_while_waiting, expires_while_waiting])
@pytest.mark.slow
def test_a_gpu_task_releases_its_memory_as_soon_as_it(ending, gpu_app, broker, processes):
    (node,) = start_gpus(processes, gpu_app.app, GPU, TASKMESH_GPU_SLOTS=SLOTS)
    pool = gpu_pool(SimulatedProvider(GPU).snapshot()[0].uuid)
    ledger = Ledger(broker)
    admitted = ending(gpu_app, broker, node)
    ended = time.monotonic()
    while ledger.used([pool])[pool]:
        assert time.monotonic() - ended < PROMPT_S, f"{ledger.used([pool])[pool]} MiB still reserved"
        time.sleep(0.02)
    counters = stats(gpu_app.app, node)["counters"]
    assert (counters.get("admitted", 0), counters.get("released", 0)) == (admitted, admitted)
    assert gpu_app.ten_gib.delay(0.1, label="next").get(timeout=60)["label"] == "next"

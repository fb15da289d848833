"""Tasks Celery schedules for later — a countdown or ETA, a ``self.retry()``, a rate
limit — are admitted when they are about to run, not when they arrive: each holds its
GPU memory while it runs, and two that do not fit together never overlap.

Each scenario waits longer than ``RECONCILE_AFTER_S`` between arrival and start, the
time after which a reservation whose request Celery does not hold as reserved is
given back: a task admitted on arrival would run with nothing reserved.
"""

from __future__ import annotations

import time

import pytest

from taskmesh.core.claims import gpu_pool
from taskmesh.hardware.simulated import SimulatedProvider
from taskmesh.state.ledger import Ledger
from taskmesh.worker.controller import RECONCILE_AFTER_S

from .conftest import wait_until
from .test_admission import GIB, most_at_once, start_gpus, stats

POOL = gpu_pool(SimulatedProvider("1x24GiB").snapshot()[0].uuid)

GPU = "1x16GiB"  # room for one 10 GiB task at a time
SLOTS = "2"  # two pool slots, so only the ledger keeps a second 10 GiB task from starting
COUNTDOWN_S = RECONCILE_AFTER_S + 3


@pytest.mark.slow
def test_two_countdown_tasks_that_do_not_fit_together_never_overlap(gpu_app, processes):
    start_gpus(processes, gpu_app.app, GPU, TASKMESH_GPU_SLOTS=SLOTS)
    sent = time.time()
    results = [gpu_app.ten_gib.apply_async((2.0,), {"label": i}, countdown=COUNTDOWN_S) for i in range(2)]
    finished = [r.get(timeout=120) for r in results]
    assert sorted(f["label"] for f in finished) == [0, 1]
    assert min(f["started"] for f in finished) >= sent + COUNTDOWN_S - 0.5  # the countdown was kept
    assert most_at_once(finished) == 1


@pytest.mark.slow
def test_a_task_retried_with_a_countdown_holds_its_reservation_while_it_runs(gpu_app, broker, processes):
    start_gpus(processes, gpu_app.app, GPU, TASKMESH_GPU_SLOTS=SLOTS)
    result = gpu_app.retries_once.delay(1.0, COUNTDOWN_S)
    second = result.get(timeout=120)
    assert second["label"] == 1
    assert second["reserved_mib"] == 10 * GIB  # read by the retried run at the end of its run
    assert [r.decode() for r in broker.lrange(gpu_app.RUNS, 0, -1)] == [result.id, result.id]


@pytest.mark.slow
def test_a_rate_limited_task_waits_for_memory_when_its_turn_comes(gpu_app, processes):
    """The second ``rate_limited`` run is due ten seconds after the first, while an
    unlimited 10 GiB task sent in between still runs: it must wait for that one."""
    start_gpus(processes, gpu_app.app, GPU, TASKMESH_GPU_SLOTS=SLOTS)
    limited = [gpu_app.rate_limited.delay(seconds, label=f"limited{i}") for i, seconds in enumerate((0.5, 2.0))]
    limited[0].get(timeout=60)
    time.sleep(1.0)
    between = gpu_app.ten_gib.delay(12.0, label="between")
    finished = [r.get(timeout=120) for r in [*limited, between]]
    started = {f["label"]: f["started"] for f in finished}
    assert started["limited1"] - started["limited0"] >= 9  # Celery's rate limit was kept
    assert started["between"] < started["limited1"]  # the second limited run came due while it ran
    assert most_at_once(finished) == 1


@pytest.mark.slow
def test_a_scheduled_gpu_task_that_comes_due_while_every_slot_runs_is_reserved_only_when_one_frees(
        gpu_app, broker, processes):
    """Found by the warm-model benchmark: a GPU task arriving while every pool slot runs was
    admitted at once — reserved for a task the pool could not start, which a model's eviction
    could then overcommit. Here B, scheduled first, comes due while A fills the one slot."""
    (node,) = start_gpus(processes, gpu_app.app, "1x24GiB", TASKMESH_GPU_SLOTS="1")
    later = gpu_app.two_gib.apply_async((0.1,), {"label": "later"}, countdown=3)
    wait_until(lambda: gpu_app.app.control.inspect(destination=[node], timeout=2).scheduled().get(node),
               "B scheduled at the worker")
    first = gpu_app.two_gib.apply_async((8.0,), {"label": "first"})
    wait_until(lambda: len(Ledger(broker).holders(POOL)) == 1, "A runs")
    time.sleep(5)  # B came due 2 s ago, while A still runs
    assert stats(gpu_app.app, node)["held"] == 1  # B is at the worker, due, waiting for the slot
    assert len(Ledger(broker).holders(POOL)) == 1  # and nothing is reserved for it yet
    assert first.get(timeout=30)["label"] == "first" and later.get(timeout=30)["label"] == "later"

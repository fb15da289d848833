"""The reservation ledger against a real Redis: atomic, all-or-nothing, and expiring."""

from __future__ import annotations

import threading
import time

from taskmesh.core.claims import Claim, gpu_pool, host_threads_pool
from taskmesh.state.ledger import Ledger


def test_reservations_never_exceed_capacity_under_contention(broker):
    ledger = Ledger(broker)
    pool = gpu_pool("GPU-a")
    won: list[str] = []

    def contend(n: int) -> None:
        for i in range(25):
            rid = f"w{n}-{i}"
            if ledger.reserve(rid, [Claim(pool, 10 * 1024, 24 * 1024)]) is None:
                won.append(rid)

    threads = [threading.Thread(target=contend, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(won) == 2
    assert ledger.used([pool]) == {pool: 20 * 1024}


def test_a_refusal_names_the_pool_and_takes_nothing(broker):
    ledger = Ledger(broker)
    gpu, threads = gpu_pool("GPU-b"), host_threads_pool("h")
    assert ledger.reserve("one", [Claim(threads, 2, 2)]) is None
    refusal = ledger.reserve("two", [Claim(gpu, 1024, 8192), Claim(threads, 1, 2)])
    assert refusal is not None and refusal.pool == threads and refusal.used == 2
    assert ledger.used([gpu, threads]) == {gpu: 0, threads: 2}  # the GPU claim was not taken either


def test_release_frees_and_reserving_the_same_id_twice_counts_once(broker):
    ledger = Ledger(broker)
    pool = gpu_pool("GPU-c")
    assert ledger.reserve("r", [Claim(pool, 6000, 8000)]) is None
    assert ledger.reserve("r", [Claim(pool, 6000, 8000)]) is None
    assert ledger.used([pool]) == {pool: 6000}
    ledger.release("r", [pool])
    assert ledger.used([pool]) == {pool: 0}


def test_unrefreshed_reservations_expire_and_refreshed_ones_stay(broker):
    ledger = Ledger(broker, ttl_s=2.0)
    pool = gpu_pool("GPU-d")
    assert ledger.reserve("kept", [Claim(pool, 1000, 8000)]) is None
    assert ledger.reserve("dropped", [Claim(pool, 2000, 8000)]) is None
    deadline = time.monotonic() + 2.6
    while time.monotonic() < deadline:
        assert ledger.refresh({"kept": {pool: 1000}}) == []
        time.sleep(0.3)
    assert ledger.used([pool]) == {pool: 1000}
    assert set(ledger.holders(pool)) == {"kept"}


def test_reserve_first_takes_the_first_option_that_fits_whole_and_names_every_refusal(broker):
    ledger = Ledger(broker)
    full, roomy, threads = gpu_pool("GPU-e"), gpu_pool("GPU-f"), host_threads_pool("h2")
    assert ledger.reserve("resident", [Claim(full, 7000, 8000)]) is None
    assert ledger.reserve("busy", [Claim(threads, 3, 4)]) is None
    options = [[Claim(full, 2000, 8000)], [Claim(roomy, 2000, 8000), Claim(threads, 2, 4)], [Claim(roomy, 2000, 8000)]]
    taken, refusals = ledger.reserve_first("task", options)
    assert taken == 2 and not refusals
    assert ledger.used([full, roomy, threads]) == {full: 7000, roomy: 2000, threads: 3}  # option 2 took nothing
    again = [[Claim(threads, 1, 4)], [Claim(roomy, 2000, 8000)]]  # the first would fit, but "task" holds the second
    assert ledger.reserve_first("task", again) == (1, ())
    assert ledger.used([full, roomy, threads]) == {full: 7000, roomy: 2000, threads: 3}
    taken, refusals = ledger.reserve_first("other", options[:2])
    assert taken is None and [(r.pool, r.used) for r in refusals] == [(full, 7000), (threads, 3)]

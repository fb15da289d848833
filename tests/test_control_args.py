"""Remote-control arguments are checked before a worker acts: anyone who can write to the
broker can broadcast them, so an unbounded pool size or an undeclared queue is refused."""

from __future__ import annotations

import socket
import time

import pytest

from taskmesh.core.control_args import assist_problem, resize_problem

from .conftest import wait_for_workers

QUEUES = {"gpu", "cpu_intensive", "cpu_light", "mixed"}


@pytest.mark.parametrize(("n", "problem"), [
    (10**6, "n=1000000 would make 1000004 processes; this pool may hold at most 8 (it has 4)"),
    (-4, "n=-4 would leave 0 processes; the pool keeps at least 1 (it has 4)"),
    ("2", "n must be a whole number, not '2'"),
    (True, "n must be a whole number, not True"),
    (2.5, "n must be a whole number, not 2.5"),
])
def test_a_resize_beyond_the_pool_s_bounds_or_not_a_number_is_refused(n, problem):
    assert resize_problem(n, size=4, ceiling=8) == problem


def test_a_resize_within_the_bounds_is_allowed():
    assert [resize_problem(n, size=4, ceiling=8) for n in (-3, 0, 4)] == [None, None, None]


@pytest.mark.parametrize(("queue", "problem"), [
    ("celery", "unknown queue 'celery'; this app declares cpu_intensive, cpu_light, gpu, mixed"),
    ("x" * 500, "queue must be a queue name, not '" + "x" * 40 + "'"),
    (["gpu"], "queue must be a queue name, not \"['gpu']\""),
])
def test_assisting_a_queue_the_app_does_not_declare_is_refused(queue, problem):
    assert assist_problem(queue, QUEUES) == problem


def test_assisting_a_declared_queue_or_nothing_is_allowed():
    assert [assist_problem(q, QUEUES) for q in ("cpu_light", "", None)] == [None, None, None]


@pytest.mark.slow
def test_a_real_worker_refuses_out_of_bounds_commands_and_keeps_its_pool(e2e, processes):
    node = f"bounds@{socket.gethostname()}"
    processes.celery_worker("tests.apps.e2e_app", "-Q", "cpu_intensive", "-P", "prefork", "-c", "1", "-n", node)
    wait_for_workers(e2e.app, [node])
    control = e2e.app.control

    def call(command: str, **arguments) -> dict[str, str]:
        (reply,) = control.broadcast(command, arguments=arguments, destination=[node], reply=True, timeout=5)
        return reply[node]

    def pool_size() -> int:
        return len(control.inspect(destination=[node], timeout=5).stats()[node]["pool"]["processes"])

    assert "this pool may hold at most" in call("taskmesh_resize", n=100_000)["error"]
    assert "the pool keeps at least 1" in call("taskmesh_resize", n=-1)["error"]
    assert pool_size() == 1
    assert call("taskmesh_resize", n=1) == {"ok": "pool size 2"}  # within bounds it acts
    deadline = time.monotonic() + 20
    while pool_size() != 2:
        assert time.monotonic() < deadline, "the pool never grew to 2 processes"
        time.sleep(0.2)
    assert call("taskmesh_assist", queue="not-a-queue")["error"].startswith("unknown queue 'not-a-queue'")
    assert call("taskmesh_assist", queue="cpu_light") == {"ok": "assisting cpu_light"}

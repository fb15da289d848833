"""A broker connection drop while a GPU task is held: the task still runs exactly once.

When the worker's connections die, kombu puts every unacknowledged message back in
its queue, including the one the admission controller holds; the held copy belongs
to the dead channel and must be let go, as Celery's ``Consumer.on_close`` lets go of
its reserved requests, or the message runs twice once memory frees.
"""

from __future__ import annotations

import json
import os
import signal
import time

import psutil
import pytest
import redis

from taskmesh import create_app
from taskmesh.hardware.simulated import SimulationControl

from .conftest import AofRedis, bind, queue_depth, wait_for_workers, wait_until
from .test_admission import GIB, start_gpus, stats

QUEUE_KEYS = ["gpu"] + [f"gpu\x06\x16{p}" for p in range(1, 10)]



def drop_connections(broker, pid: int) -> int:
    """``CLIENT KILL`` every connection the process *pid* has open to this Redis; how many."""
    port = broker.connection_pool.connection_kwargs["port"]
    ours = {c.laddr.port for c in psutil.Process(pid).net_connections("tcp") if c.raddr and c.raddr.port == port}
    return sum(broker.client_kill_filter(addr=f"127.0.0.1:{p}") for p in ours)


def put_back(broker) -> bool:
    """kombu put a message back (marked ``redelivered``): it waits in the queue or was delivered again."""
    queued = [json.loads(raw) for key in QUEUE_KEYS for raw in broker.lrange(key, 0, -1)]
    delivered = [json.loads(raw)[0] for raw in broker.hvals("unacked")]
    return any(message["headers"].get("redelivered") for message in queued + delivered)


@pytest.mark.slow
@pytest.mark.parametrize("countdown", [None, 1], ids=["held-on-arrival", "held-when-due"])
def test_a_task_held_across_a_broker_connection_drop_runs_once(countdown, gpu_app, broker, processes):
    (node,) = start_gpus(processes, gpu_app.app, "1x24GiB")
    memory = SimulationControl(broker)
    memory.use(0, 20 * GIB)  # another process's memory: the task is held, unacknowledged
    result = gpu_app.ten_gib.apply_async((0.1,), {"label": "held"}, countdown=countdown)
    wait_until(lambda: stats(gpu_app.app, node)["held"] == 1, "the task was held")
    pid = gpu_app.app.control.inspect(destination=[node], timeout=5).stats()[node]["pid"]
    assert drop_connections(broker, pid)
    wait_until(lambda: put_back(broker), "kombu put the held message back")
    wait_for_workers(gpu_app.app, [node], timeout=60)
    wait_until(lambda: stats(gpu_app.app, node)["held"] == 1, "the task was held again")
    memory.use(0, 0)
    ran = result.get(timeout=60)
    # every copy settled: none left in the queue or unacknowledged, so a second run would have happened by now
    wait_until(lambda: not queue_depth(broker, "gpu") and not broker.hlen("unacked"), "every message settled")
    wait_until(lambda: not stats(gpu_app.app, node)["running"], "nothing runs")
    assert [r.decode() for r in broker.lrange(gpu_app.RUNS, 0, -1)] == [result.id]
    assert ran["label"] == "held" and ran["redelivered"]  # what ran is the copy kombu put back


def _client_reconnected(app) -> bool:
    """kombu's pooled connections fail once after a restart, then reconnect."""
    try:
        app.control.ping(timeout=0.2)
    except redis.ConnectionError:
        return False
    return True


@pytest.fixture
def own_redis(tmp_path):
    server = AofRedis(tmp_path)
    yield server
    server.stop()


def client_app(url: str):
    """An app of this test's own on *url* (the shared test apps keep pools to the session's Redis)."""
    app = create_app("tests.apps.gpu_app", broker=url, result_backend=url)

    @app.task(name="tests.apps.gpu_app.ten_gib", bind=True, profile="gpu", vram="10GiB", time_limit=120)
    def ten_gib(self, seconds: float = 0.5, label: object = None) -> None:
        """Run by the worker's own definition; declared here to send it with its requirement."""

    return app, ten_gib


@pytest.mark.slow
def test_a_task_held_across_a_redis_restart_runs_once(own_redis, processes):
    app, ten_gib = client_app(own_redis.url)
    broker = redis.Redis.from_url(own_redis.url)
    (node,) = start_gpus(processes, app, "1x24GiB", TASKMESH_BROKER_URL=own_redis.url)
    memory = SimulationControl(broker)
    memory.use(0, 20 * GIB)
    result = ten_gib.delay(0.1, label="held")
    wait_until(lambda: stats(app, node)["held"] == 1, "the task was held")
    # a clean stop, down long enough that kombu cannot put the message back as it closes
    own_redis.restart(down_s=3.0, sig=signal.SIGTERM)
    wait_until(lambda: _client_reconnected(app), "this test's client reconnected")
    wait_for_workers(app, [node], timeout=60)
    wait_until(lambda: stats(app, node)["held"] == 1, "the task was held again",
               seen=lambda: f"(queued {queue_depth(broker, 'gpu')}, unacked {broker.hlen('unacked')})")
    memory.use(0, 0)
    ran = result.get(timeout=60)
    wait_until(lambda: not queue_depth(broker, "gpu") and not broker.hlen("unacked"), "every message settled")
    wait_until(lambda: not stats(app, node)["running"], "nothing runs")
    assert [r.decode() for r in broker.lrange("test:runs", 0, -1)] == [result.id]
    assert ran["label"] == "held"



@pytest.mark.slow
@pytest.mark.parametrize("task, runs_expected", [("once_job", 1), ("plain_job", 2)])
def test_a_task_running_across_a_connection_drop_runs_again_unless_once(task, runs_expected, broker_url, broker,
                                                                         processes):
    """kombu puts a running task's message back as the dropped channel closes, and its ack
    can no longer reach Redis: Celery runs it again after the first run ends (README,
    "When a task can still run twice"). ``once=True`` skips that second delivery."""
    from tests.apps import once_app

    once_app = bind(once_app, broker_url)
    worker = processes.celery_worker("tests.apps.once_app", "-Q", "cpu_intensive", "-c", "1", "-n", "drop@%h")
    node = f"drop@{os.uname().nodename}"
    wait_for_workers(once_app.app, [node])
    result = getattr(once_app, task).apply_async((4.0,))
    wait_until(lambda: broker.lrange(once_app.RUNS, 0, -1), "the task started")
    assert drop_connections(broker, worker.pid)
    result.get(timeout=60)
    wait_until(lambda: not queue_depth(broker, "cpu_intensive") and not broker.hlen("unacked")
               and broker.llen(once_app.RUNS) >= runs_expected, "every copy settled")
    time.sleep(1.0)  # a further run would have been recorded by now: nothing is left to deliver
    assert [r.decode() for r in broker.lrange(once_app.RUNS, 0, -1)] == [result.id] * runs_expected

"""RabbitMQ as broker, with taskmesh's state (ledger, registry, results) on the test session's
Redis (``TASKMESH_STATE_URL``): the core end-to-end behaviour holds as on a Redis broker —
admission, no oversubscription, priorities, a dead worker's task run again, depth shown —
and without a state URL a GPU worker and a GPU submit refuse with one line naming it.

A real ``rabbitmq-server`` (Debian's package) with its own ``epmd``, both on free loopback
ports and stopped by pid, one per module; skipped with the reason where the package is not
installed. Each test purges the queues it may have left messages in.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from kombu import Connection

from taskmesh import QueueFull, create_app
from taskmesh.core.claims import gpu_pool
from taskmesh.core.errors import ConfigError
from taskmesh.core.profiles import Priority
from taskmesh.hardware.simulated import SimulatedProvider, SimulationControl
from taskmesh.run.stack import free_port
from taskmesh.state.client import state_client
from taskmesh.state.ledger import Ledger

from .conftest import Processes, bind, wait_for_workers, wait_until
from .test_admission import GIB, most_at_once, start_gpus, stats
from .test_metrics import scrape, start_exporter
from .test_status import taskmesh_cli

SERVER = "/usr/lib/rabbitmq/bin/rabbitmq-server"
APP = "tests.apps.e2e_app"


@pytest.fixture(scope="module")
def rabbitmq(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    if not (os.path.exists(SERVER) and shutil.which("epmd")):
        pytest.skip("rabbitmq-server is not installed (scripts/setup test installs Debian's rabbitmq-server)")
    home = tmp_path_factory.mktemp("rabbitmq")
    (home / "enabled_plugins").write_text("[].\n")
    port, epmd_port, dist_port = free_port(), free_port(), free_port()
    env = {"HOME": str(home), "ERL_EPMD_PORT": str(epmd_port), "RABBITMQ_NODENAME": f"tm{os.getpid()}@localhost",
           "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1", "RABBITMQ_NODE_PORT": str(port),
           "RABBITMQ_DIST_PORT": str(dist_port), "RABBITMQ_MNESIA_BASE": str(home / "mnesia"),
           "RABBITMQ_LOG_BASE": str(home / "log"), "RABBITMQ_ENABLED_PLUGINS_FILE": str(home / "enabled_plugins"),
           "RABBITMQ_CONFIG_FILE": str(home / "none")}
    procs = Processes()
    try:
        procs.start(["epmd", "-port", str(epmd_port), "-address", "127.0.0.1"], env, stdout=subprocess.DEVNULL)
        with (home / "server.out").open("wb") as out:
            procs.start([SERVER], env, stdout=out, stderr=subprocess.STDOUT)
        url = f"amqp://guest:guest@127.0.0.1:{port}//"
        deadline = time.monotonic() + 90
        while True:
            try:
                with Connection(url, connect_timeout=1) as conn:
                    conn.connect()
                break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail(f"rabbitmq-server did not start: {(home / 'server.out').read_text()[-2000:]}")
                time.sleep(0.5)
        yield url
    finally:
        procs.stop_all()


def worker(processes: Processes, url: str, queues: str, log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return processes.start([sys.executable, "-m", "celery", "-A", APP, "worker", "-Q", queues, "-n",
                                f"{queues.replace(',', '-')}@rabbit", "--loglevel", "WARNING"],
                               {"TASKMESH_BROKER_URL": url, "TASKMESH_SIMULATE_GPUS": "1x24GiB"},
                               stdout=out, stderr=subprocess.STDOUT)


@pytest.fixture
def on_rabbit(rabbitmq, broker_url, monkeypatch):
    """``tests.apps.gpu_app`` on RabbitMQ, its state on this test's Redis; workers inherit both."""
    from tests.apps import gpu_app

    monkeypatch.setenv("TASKMESH_BROKER_URL", rabbitmq)
    monkeypatch.setenv("TASKMESH_STATE_URL", broker_url)
    bind(gpu_app, rabbitmq, state_url=broker_url)
    gpu_app.app.control.purge()  # what an earlier test of this module left queued
    try:
        yield gpu_app
    finally:
        bind(gpu_app, broker_url)  # later tests' gpu_app must not reach for this RabbitMQ


def ran(broker, app) -> list[str]:
    return [r.decode() for r in broker.lrange(app.RUNS, 0, -1)]


def used(broker, spec: str) -> int:
    pool = gpu_pool(SimulatedProvider(spec).snapshot()[0].uuid)
    return Ledger(broker).used([pool])[pool]


def waiting(queue: str) -> int:
    """``waiting`` of *queue* in ``taskmesh status --json``, as a user reads it."""
    data = json.loads(taskmesh_cli("-A", "tests.apps.gpu_app", "status", "--json"))
    return next(q["waiting"] for q in data["queues"] if q["name"] == queue)


@pytest.mark.slow
def test_without_a_state_url_a_gpu_worker_stops_with_one_line_naming_it_and_a_cpu_worker_runs(rabbitmq, processes,
                                                                                               tmp_path):
    from tests.apps import e2e_app

    before = e2e_app.app.conf.broker_url
    bind(e2e_app, rabbitmq)
    try:
        cpu = worker(processes, rabbitmq, "cpu_intensive", tmp_path / "cpu.log")
        wait_for_workers(e2e_app.app, ["cpu_intensive@rabbit"])  # the broker works for a worker taking no GPU work
        assert cpu.poll() is None
        with pytest.raises(ValueError, match="set TASKMESH_STATE_URL") as refused:  # nothing sent unguarded
            e2e_app.on_gpu.delay()
        assert "\n" not in str(refused.value)
    finally:
        bind(e2e_app, before)  # later tests' e2e_app must not reach for this RabbitMQ
    gpu = worker(processes, rabbitmq, "gpu", tmp_path / "gpu.log")
    assert gpu.wait(90) == 2
    said = (tmp_path / "gpu.log").read_text()
    stopped = [line for line in said.splitlines() if "GPU tasks would run unguarded" in line]
    assert len(stopped) == 1 and "consumes gpu, but its broker amqp://guest:**@127.0.0.1" in stopped[0]
    assert "Set TASKMESH_STATE_URL to a Redis URL" in stopped[0]
    assert "Traceback" not in said and "Unrecoverable" not in said


@pytest.mark.slow
def test_two_10gib_tasks_on_a_16gib_gpu_are_admitted_one_at_a_time_and_the_ledger_ends_at_zero(on_rabbit, broker,
                                                                                                processes):
    spec = "1x16GiB"
    (node,) = start_gpus(processes, on_rabbit.app, spec, TASKMESH_GPU_SLOTS="2")  # it takes both, holds one
    results = [on_rabbit.ten_gib.delay(1.0, label=i) for i in range(2)]
    wait_until(lambda: used(broker, spec) == 10 * GIB, "a 10 GiB reservation in the Redis ledger", 30)
    finished = [r.get(timeout=60) for r in results]
    assert sorted(f["label"] for f in finished) == [0, 1]
    assert most_at_once(finished) == 1  # the second was held until the first's memory was free
    assert sorted(ran(broker, on_rabbit)) == sorted(r.id for r in results)  # each ran once
    counters = stats(on_rabbit.app, node)["counters"]
    assert counters["admitted"] == 2 and counters["waits"] > 0
    wait_until(lambda: used(broker, spec) == 0, "the ledger back at 0", 10)


@pytest.mark.slow
def test_critical_runs_before_low_when_both_wait_and_the_depth_shows_and_holds_back(on_rabbit, rabbitmq, broker_url,
                                                                                    broker, processes, tmp_path):
    low = [on_rabbit.two_gib.apply_async((0.2,), {"label": f"low{i}"}, priority=Priority.LOW) for i in range(2)]
    critical = on_rabbit.two_gib.apply_async((0.2,), {"label": "critical"}, priority=Priority.CRITICAL)
    normal = on_rabbit.two_gib.apply_async((0.2,), {"label": "normal"}, priority="NORMAL")
    assert waiting("gpu") == 4  # RabbitMQ's count, from a passive declare
    assert scrape(start_exporter(processes)).value("taskmesh_queue_waiting", queue="gpu") == 4
    (tmp_path / "full.yaml").write_text("queues:\n  gpu:\n    max_depth: 4\n")
    full = create_app("producer", broker=rabbitmq, state=broker_url, hardware=str(tmp_path / "full.yaml"))

    @full.task(name=on_rabbit.two_gib.name, profile="gpu", vram="2GiB", shared=False)
    def one_more() -> None:
        return None

    with pytest.raises(QueueFull, match="queue 'gpu' has 4 tasks waiting"):  # max_depth, from the same count
        one_more.delay()
    start_gpus(processes, on_rabbit.app, "1x24GiB")
    for result in (critical, normal, *low):
        result.get(timeout=60)
    assert ran(broker, on_rabbit) == [critical.id, normal.id, low[0].id, low[1].id]
    assert waiting("gpu") == 0


@pytest.mark.slow
def test_a_sigkilled_workers_task_is_delivered_again_by_rabbitmq_and_runs_to_the_end(on_rabbit, broker, processes):
    spec = "1x16GiB"
    (node,) = start_gpus(processes, on_rabbit.app, spec, TASKMESH_RESERVATION_TTL_S="6", TASKMESH_DEAD_AFTER_S="8")
    result = on_rabbit.ten_gib.delay(6.0, label="survivor")
    wait_until(lambda: ran(broker, on_rabbit) == [result.id], "the task started", 30)
    os.kill(on_rabbit.app.control.inspect(destination=[node], timeout=5).stats()[node]["pid"], signal.SIGKILL)
    ran_again = result.get(timeout=90)  # the supervisor restarts the worker; RabbitMQ redelivers the message
    assert ran_again["label"] == "survivor" and ran_again["redelivered"]
    assert ran(broker, on_rabbit) == [result.id, result.id]
    wait_until(lambda: used(broker, spec) == 0, "the ledger back at 0 (the dead worker's reservation expired)", 15)


@pytest.mark.slow
def test_a_held_low_task_that_fits_does_not_overtake_a_held_critical_one(on_rabbit, broker, processes):
    """The worker reads a delivered priority on taskmesh's scale: RabbitMQ's is turned over."""
    (node,) = start_gpus(processes, on_rabbit.app, "1x24GiB", TASKMESH_GPU_SLOTS="4")
    memory = SimulationControl(broker)
    memory.use(0, 20 * GIB)
    head = on_rabbit.ten_gib.apply_async((0.1,), {"label": "head"}, priority=Priority.CRITICAL)
    wait_until(lambda: stats(on_rabbit.app, node)["held"] == 1, "the critical task was held")
    low = on_rabbit.two_gib.apply_async((0.1,), {"label": "low"}, priority=Priority.LOW)
    wait_until(lambda: stats(on_rabbit.app, node)["held"] == 2, "the low one was held behind it")
    urgent = on_rabbit.two_gib.apply_async((0.1,), {"label": "urgent"}, priority=Priority.CRITICAL)
    urgent.get(timeout=30)  # as urgent as the head: it may fill the gap, so the low one could have
    assert ran(broker, on_rabbit) == [urgent.id] and stats(on_rabbit.app, node)["held"] == 2
    memory.use(0, 0)
    for result in (head, low):
        result.get(timeout=30)
    assert ran(broker, on_rabbit) == [urgent.id, head.id, low.id]
    wait_until(lambda: waiting("gpu") == 0, "the queue drained", 10)


def test_a_state_url_is_taskmeshs_redis_and_result_backend_with_its_own_tls_settings(monkeypatch):
    monkeypatch.delenv("TASKMESH_STATE_URL", raising=False)
    app = create_app("state-url", broker="amqp://guest:secret@127.0.0.1:1//",
                     state="rediss://:pw@127.0.0.1:1/2?ssl_cert_reqs=CERT_NONE", broker_use_ssl={"ca_certs": "/x"})
    assert app.conf.result_backend == app.conf.taskmesh_state_url
    client = state_client(app)
    kwargs = client.connection_pool.connection_kwargs
    assert (kwargs["db"], kwargs["password"], kwargs["ssl_cert_reqs"]) == (2, "pw", ssl.CERT_NONE)
    app.conf.taskmesh_state_url, app.conf.taskmesh_state_use_ssl = "redis://127.0.0.1:1/0", {"ssl_cert_reqs": "none"}
    assert state_client(app).connection_pool.connection_kwargs["ssl_cert_reqs"] == ssl.CERT_NONE  # TLS turned on
    app.conf.taskmesh_state_url = "redsi://127.0.0.1:1/0"
    with pytest.raises(ConfigError, match="TASKMESH_STATE_URL: 'redsi://127.0.0.1:1/0' is not a Redis URL; set it"):
        state_client(app)

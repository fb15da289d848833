"""RabbitMQ as broker: taskmesh keeps its GPU ledger in Redis, so on any other broker a
worker must not take GPU work it cannot guard (fail closed), while the rest still runs.

A real ``rabbitmq-server`` (Debian's package) with its own ``epmd``, both on free loopback
ports and stopped by pid; skipped with the reason where the package is not installed.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from kombu import Connection

from taskmesh.run.stack import free_port

from .conftest import Processes, bind, wait_for_workers

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


@pytest.mark.slow
def test_on_rabbitmq_a_gpu_worker_stops_with_one_line_and_a_cpu_worker_runs(rabbitmq, processes, tmp_path):
    from tests.apps import e2e_app

    before = e2e_app.app.conf.broker_url
    bind(e2e_app, rabbitmq)
    try:
        cpu = worker(processes, rabbitmq, "cpu_intensive", tmp_path / "cpu.log")
        wait_for_workers(e2e_app.app, ["cpu_intensive@rabbit"])  # the broker works for a worker taking no GPU work
        assert cpu.poll() is None
    finally:
        bind(e2e_app, before)  # later tests' e2e_app must not reach for this RabbitMQ
    gpu = worker(processes, rabbitmq, "gpu", tmp_path / "gpu.log")
    assert gpu.wait(90) == 2
    said = (tmp_path / "gpu.log").read_text()
    assert "consumes gpu, but its broker amqp://guest:**@127.0.0.1" in said and "GPU tasks would run unguarded" in said
    assert "Traceback" not in said and "Unrecoverable" not in said

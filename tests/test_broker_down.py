"""Redis going away: producers get kombu's ``OperationalError`` naming the broker and the
fix, the worker says so once and once more when it is back, and both carry on after.

Each test runs a redis-server of its own and stops it by pid; the session one stays up.
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
import redis
from kombu.exceptions import OperationalError

from taskmesh import create_app
from taskmesh.run.stack import free_port

from .conftest import queue_depth, wait_for_workers

APP = "tests.apps.e2e_app"


def start_redis(port: int, *extra: str) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen([shutil.which("redis-server"), "--port", str(port), "--bind", "127.0.0.1",
                             "--save", "", "--appendonly", "no", *extra], stdout=subprocess.DEVNULL)
    client = redis.Redis(port=port, password=extra[-1] if "--requirepass" in extra else None)
    deadline = time.monotonic() + 20
    while True:
        try:
            client.ping()
            return proc
        except redis.ConnectionError:
            assert time.monotonic() < deadline, "redis-server did not start"
            time.sleep(0.05)


def stop_redis(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)


def producer(url: str):
    app = create_app("broker_down", broker=url)

    @app.task(name=f"{APP}.on_gpu", profile="gpu", vram="4GiB")
    def on_gpu(seconds: float = 0.0, label=None):
        raise AssertionError("runs on the worker only")

    @app.task(name=f"{APP}.on_io", profile="io")
    def on_io(seconds: float = 0.0, label=None):
        raise AssertionError("runs on the worker only")

    return app, on_gpu, on_io


@pytest.mark.slow
def test_a_producer_gets_one_operational_error_naming_the_broker_and_carries_on_when_it_is_back():
    port = free_port()
    server = start_redis(port, "--requirepass", "s3cret")
    try:
        app, on_gpu, on_io = producer(f"redis://:s3cret@127.0.0.1:{port}/0")
        on_io.delay(label="while up")
        stop_redis(server)
        # taskmesh's own GPU checks; the publish; and, once its connection is known broken,
        # Celery's result subscription, which fails after the result backend's own retries
        for task, options in ((on_gpu, {}), (on_io, {}), (on_io, {"ignore_result": True}), (on_io, {})):
            with pytest.raises(OperationalError) as caught:
                task.apply_async(**options)
            message = str(caught.value)
            assert f"redis://:**@127.0.0.1:{port}/0" in message, message
            assert "s3cret" not in message and "\n" not in message.strip(), message
            assert "nothing was sent" in message and "taskmesh up" in message, message
        server = start_redis(port, "--requirepass", "s3cret")
        on_io.delay(label="after")  # this Redis keeps nothing: the one sent before is gone with it
        assert queue_depth(redis.Redis(port=port, password="s3cret"), "cpu_light") == 1
    finally:
        if server.poll() is None:
            stop_redis(server)


@pytest.mark.slow
def test_the_worker_says_once_that_the_broker_is_gone_and_once_that_it_is_back(processes, tmp_path):
    port = free_port()
    server = start_redis(port)
    url = f"redis://127.0.0.1:{port}/0"
    try:
        processes.taskmesh("-A", APP, "worker", "--profile", "cpu_intensive", "--logdir", str(tmp_path),
                           env={"TASKMESH_BROKER_URL": url})
        app, _, _ = producer(url)
        wait_for_workers(app, [f"cpu@{socket.gethostname()}"], timeout=120)
        log = next(tmp_path.glob("*.log"))
        stop_redis(server)
        wait_for_line(log, "taskmesh heartbeat: broker", "unreachable")
        time.sleep(8)  # four heartbeats while it is down
        server = start_redis(port)
        line = wait_for_line(log, "taskmesh heartbeat: broker", "reachable again")
        failed_beats = int(line.split("after ")[1].split()[0])
        assert failed_beats >= 3, line  # the beats went on failing, quietly
        text = log.read_text()
        gone = [x for x in text.splitlines() if "taskmesh heartbeat: broker" in x and "unreachable" in x]
        assert len(gone) == 1, text
        assert "taskmesh heartbeat failed" not in text, text
    finally:
        if server.poll() is None:
            stop_redis(server)


def wait_for_line(log: Path, *parts: str, timeout: float = 60) -> str:
    deadline = time.monotonic() + timeout
    while True:
        text = log.read_text(errors="replace") if log.exists() else ""
        for line in text.splitlines():
            if all(part in line for part in parts):
                return line
        assert time.monotonic() < deadline, f"no line with {parts} in {log}:\n{text[-3000:]}"
        time.sleep(0.5)

"""Real parts for every test: a redis-server per session on a free loopback port,
and helpers that start real worker processes and stop them by process id."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
import redis

from taskmesh.run.stack import free_port, redis_command, wait_for_redis
from taskmesh.run.supervisor import stop_process

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def redis_server() -> Iterator[str]:
    server = shutil.which("redis-server")
    if server is None:
        pytest.fail("redis-server is not installed; scripts/test installs it (apt-get install redis-server)")
    port = free_port()
    proc = subprocess.Popen(
        [server, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
    )
    client = redis.Redis(port=port)
    deadline = time.monotonic() + 10
    while True:
        try:
            client.ping()
            break
        except redis.ConnectionError:
            if time.monotonic() > deadline:
                proc.kill()
                raise
            time.sleep(0.05)
    yield f"redis://127.0.0.1:{port}"
    proc.terminate()
    proc.wait(10)


@pytest.fixture
def broker_url(redis_server: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """A clean database for each test, exported as TASKMESH_BROKER_URL."""
    url = f"{redis_server}/0"
    redis.Redis.from_url(url).flushall()
    monkeypatch.setenv("TASKMESH_BROKER_URL", url)
    return url


def bind(module, broker_url: str, state_url: str | None = None):
    """Point a test app module at *broker_url* (this session's Redis), with no state from another
    test. Celery keeps the connection pools and the result backend it made at first use, so a
    test that pointed the app at another server (its own Redis, RabbitMQ) would leave them behind.
    *state_url*: taskmesh's Redis (and the result backend) when the broker is not Redis."""
    app = module.app
    app.conf.broker_url = broker_url
    app.conf.taskmesh_state_url = state_url
    app.conf.result_backend = state_url or broker_url
    app._pool = None
    if "amqp" in app.__dict__:
        app.amqp._producer_pool = None
    app._backend_cache, app._local = None, threading.local()  # a backend that is not thread safe is per thread
    app._redis = None  # taskmesh's own client
    app._submit_policy = None  # its registry view is cached for two seconds
    return module


@pytest.fixture
def e2e(broker_url: str):
    """``tests.apps.e2e_app``: one task per profile, each reporting where it ran."""
    from tests.apps import e2e_app

    return bind(e2e_app, broker_url)


@pytest.fixture
def gpu_app(broker_url: str):
    """``tests.apps.gpu_app``: GPU tasks of declared sizes, every run recorded in Redis."""
    from tests.apps import gpu_app

    return bind(gpu_app, broker_url)


@pytest.fixture
def model_app(broker_url: str):
    """``tests.apps.model_app``: declared models whose loaders sleep, and tasks that use them."""
    from tests.apps import model_app

    return bind(model_app, broker_url)


@pytest.fixture
def broker(broker_url: str) -> redis.Redis:
    return redis.Redis.from_url(broker_url)


class Processes:
    """Processes a test starts; every one is stopped by its pid (and process group) at the end."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, argv: list[str], env: dict[str, str] | None = None, **kwargs) -> subprocess.Popen[bytes]:
        merged = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        proc = subprocess.Popen(argv, env=merged, cwd=ROOT, start_new_session=True, **kwargs)
        self.procs.append(proc)
        return proc

    def taskmesh(self, *args: str, env: dict[str, str] | None = None, **kwargs) -> subprocess.Popen[bytes]:
        return self.start([sys.executable, "-m", "taskmesh", *args], env, **kwargs)

    def celery_worker(self, app: str, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        return self.start([sys.executable, "-m", "celery", "-A", app, "worker", "--loglevel", "WARNING", *args], env)

    def stop(self, proc: subprocess.Popen[bytes], timeout: float = 30) -> None:
        stop_process(proc, grace_s=timeout)

    def stop_all(self) -> None:
        for proc in reversed(self.procs):
            self.stop(proc)


@pytest.fixture
def processes() -> Iterator[Processes]:
    procs = Processes()
    yield procs
    procs.stop_all()


class AofRedis:
    """A redis-server of a test's own, started as ``taskmesh up`` starts it (append-only file,
    ``everysec``), on a fixed port so clients reconnect, and restarted by its pid."""

    def __init__(self, directory: Path) -> None:
        self.port, self.directory = free_port(), directory
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc = self._start()

    def _start(self) -> subprocess.Popen[bytes]:
        self.directory.mkdir(parents=True, exist_ok=True)
        proc = subprocess.Popen(redis_command(self.port, self.directory), stdout=subprocess.DEVNULL,
                                start_new_session=True)
        wait_for_redis(self.url, timeout=30)
        return proc

    def restart(self, down_s: float, sig: int = signal.SIGKILL) -> None:
        """Kill it (after its append-only file caught up, see tests/test_stack_faults.py), stay down
        *down_s* seconds, start it again on the same port and folder."""
        from tests.test_stack_faults import wait_written_to_the_aof

        wait_written_to_the_aof(redis.Redis.from_url(self.url))
        self.proc.send_signal(sig)
        self.proc.wait(20)
        time.sleep(down_s)
        self.proc = self._start()

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(20)


def wait_until(condition, what: str, timeout: float = 60.0, seen=lambda: "") -> None:
    """Block until *condition()* is true; fail naming *what* did not happen (and *seen()*)."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what} within {timeout}s {seen()}".rstrip()
        time.sleep(0.05)


def wait_for_workers(app, names: list[str], timeout: float = 60) -> None:
    """Block until every named worker answers ping."""
    waiting = set(names)
    deadline = time.monotonic() + timeout
    while waiting:
        if time.monotonic() > deadline:
            raise AssertionError(f"workers {sorted(waiting)} did not answer ping in {timeout}s")
        for reply in app.control.ping(destination=sorted(waiting), timeout=0.5) or []:
            waiting -= set(reply)


def queue_depth(client: redis.Redis, queue: str) -> int:
    """Messages waiting in *queue* over every Redis priority sub-list."""
    return sum(client.llen(key) for key in [queue] + [f"{queue}\x06\x16{p}" for p in (1, 2, 3, 4, 5, 6, 7, 8, 9)])


def anonymous_reply(port: int, *command: str) -> bytes:
    """What Redis on *port* answers a client that never logged in, sent *command* raw (RESP):
    what any local user with ``redis-cli`` or a socket gets."""
    request = f"*{len(command)}\r\n" + "".join(f"${len(part)}\r\n{part}\r\n" for part in command)
    with socket.create_connection(("127.0.0.1", port)) as anonymous:
        anonymous.sendall(request.encode())
        return anonymous.recv(200)


def marked(marker: str) -> list[psutil.Process]:
    """Processes that inherited a test's ``TASKMESH_TEST_MARKER`` in their environment."""
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.environ().get("TASKMESH_TEST_MARKER") == marker:
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found

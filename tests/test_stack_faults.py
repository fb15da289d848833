"""The local stack under faults: a Redis restart loses nothing acknowledged, a SIGKILLed
``taskmesh up`` or ``taskmesh worker`` takes its children with it, and a port left in
TIME_WAIT by a clean stop is free for the next ``up``."""

from __future__ import annotations

import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Iterable

import psutil
import pytest
import redis

from taskmesh import create_app
from taskmesh.run.credentials import read_credentials
from taskmesh.run.stack import StackError, free_port, lock_data_dir, port_in_use

from .conftest import marked, queue_depth, wait_for_workers

APP = "tests.apps.e2e_app"


def producer(url: str):
    """A producer-only app declaring e2e_app's io task by name, as a separate service would."""
    app = create_app("producer", broker=url)

    @app.task(name=f"{APP}.on_io", profile="io", time_limit=300)
    def on_io(seconds: float = 0.0, label=None):
        raise AssertionError("runs on the worker only")

    return app, on_io


def start_up(processes, tmp_path, marker: str, *extra: str) -> tuple[subprocess.Popen, list[str]]:
    """``taskmesh up`` with its own Redis; returns it once it says it is up, with what it printed."""
    proc = processes.taskmesh(
        "-A", APP, "up", "--no-beat", "--logdir", str(tmp_path / "logs"),
        "--exporter-port", str(free_port()), *extra,
        env={"TASKMESH_TEST_MARKER": marker}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    lines: list[str] = []
    deadline = time.monotonic() + 180
    while not any("Ctrl-C stops everything" in line for line in lines):
        assert time.monotonic() < deadline and proc.poll() is None, "".join(lines)
        lines.append(proc.stdout.readline())
    return proc, lines


def kill_leftovers(proc: subprocess.Popen, marker: str, pids: Iterable[int] = ()) -> None:
    """What a failed test left: the marked processes and the supervisor's children by pid
    (redis-server rewrites its process title, so its environment cannot be read back)."""
    found = {p.pid: p for p in marked(marker)}
    if proc.poll() is None:
        found.update({p.pid: p for p in psutil.Process(proc.pid).children(recursive=True)})
    for pid in pids:
        try:
            found.setdefault(pid, psutil.Process(pid))
        except psutil.NoSuchProcess:
            pass
    for leftover in found.values():
        try:
            leftover.kill()
        except psutil.NoSuchProcess:
            pass


def wait_gone(pids: list[int], timeout: float) -> list[int]:
    """The pids still running after *timeout* seconds (zombies count as gone)."""
    deadline = time.monotonic() + timeout
    while True:
        alive = []
        for pid in pids:
            try:
                if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                    alive.append(pid)
            except psutil.NoSuchProcess:
                pass
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.5)


def wait_written_to_the_aof(client: redis.Redis) -> None:
    """Wait until Redis has written every acknowledged command to its append-only file.

    With ``appendfsync everysec`` Redis writes at once, except while the last second's
    fsync is still running on a slow disk: then it holds writes back for up to 2 s
    (``aof_delayed_fsync``), and a SIGKILL in that window loses them. A clean-clone CI run
    hit that window once; the README states the limit.
    """
    assert client.info("persistence")["aof_enabled"] == 1
    deadline = time.monotonic() + 10
    while client.info("persistence")["aof_buffer_length"]:
        assert time.monotonic() < deadline, "Redis kept writes back from its append-only file for 10 s"
        time.sleep(0.1)


def until_remote_control_answers(app, node: str, timeout: float = 60) -> None:
    """Wait until *node* answers a ping after a broker restart.

    A Celery worker reconnects its remote-control mailbox after its task consumer, on a
    connection of its own (on gevent, a greenlet that starts after Mingle), and a broadcast
    over Redis reaches only the mailboxes subscribed when it is sent: a command sent as soon
    as a task has run again can reach nobody. A CI run saw that once.
    """
    deadline = time.monotonic() + timeout
    while not app.control.ping(destination=[node], timeout=1):
        assert time.monotonic() < deadline, f"{node} ran tasks but never answered remote control again"


@pytest.mark.slow
def test_up_keeps_queued_tasks_and_results_across_a_redis_sigkill(processes, tmp_path):
    marker, port = uuid.uuid4().hex, free_port()
    data_dir = tmp_path / "redis-data"
    proc, lines = start_up(processes, tmp_path, marker, "--redis-port", str(port), "--no-flower",
                           "--data-dir", str(data_dir))
    try:
        assert any(f"redis data: {data_dir}" in line for line in lines), lines
        url = read_credentials(data_dir)["TASKMESH_BROKER_URL"]
        client = redis.Redis.from_url(url)
        app, on_io = producer(url)
        done = on_io.delay(label="before")
        assert done.get(timeout=90)["label"] == "before"
        later = [on_io.apply_async(kwargs={"label": i}, queue="later") for i in range(5)]  # nobody consumes it
        assert queue_depth(client, "later") == 5

        wait_written_to_the_aof(client)
        old = client.info("server")["process_id"]
        psutil.Process(old).send_signal(signal.SIGKILL)
        deadline = time.monotonic() + 90
        while True:
            assert time.monotonic() < deadline, "the supervisor never restarted redis-server"
            try:
                if client.info("server")["process_id"] != old:
                    break
            except redis.ConnectionError:
                pass
            time.sleep(0.2)

        assert queue_depth(client, "later") == 5
        assert app.AsyncResult(done.id).get(timeout=30)["label"] == "before"
        assert on_io.delay(label="after").get(timeout=120)["label"] == "after"  # worker and producer reconnected
        io_node = next(line.split()[1] for line in lines if line.startswith("worker: io@"))
        until_remote_control_answers(app, io_node)
        assert app.control.add_consumer("later", destination=[io_node], reply=True, timeout=10)
        assert sorted(r.get(timeout=120)["label"] for r in later) == [0, 1, 2, 3, 4]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(120) == 0
    finally:
        kill_leftovers(proc, marker)


@pytest.mark.slow
@pytest.mark.parametrize("command", ["up", "worker"])
def test_sigkill_of_the_supervisor_stops_every_child_and_frees_the_ports(command, processes, tmp_path, request):
    marker = uuid.uuid4().hex
    if command == "up":
        redis_port, flower_port = free_port(), free_port()
        proc, _ = start_up(processes, tmp_path, marker, "--redis-port", str(redis_port),
                           "--flower-port", str(flower_port), "--data-dir", str(tmp_path / "redis-data"))
        ports = [redis_port, flower_port]
    else:
        app = request.getfixturevalue("e2e").app
        proc = processes.taskmesh("-A", APP, "worker", "--profile", "cpu_intensive", "--loglevel", "WARNING",
                                  env={"TASKMESH_TEST_MARKER": marker})
        wait_for_workers(app, [f"cpu@{socket.gethostname()}"], timeout=120)
        ports = []
    children = [p.pid for p in psutil.Process(proc.pid).children(recursive=True)]
    assert len(children) >= (5 if command == "up" else 2), children  # up: redis, 3 workers, flower, exporter
    try:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        assert wait_gone(children, timeout=90) == []
        deadline = time.monotonic() + 30
        while any(port_in_use(p) for p in ports) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert [p for p in ports if port_in_use(p)] == []
    finally:
        kill_leftovers(proc, marker, children)


def test_a_port_left_in_time_wait_by_a_clean_stop_is_free():
    port = free_port()
    with socket.create_server(("127.0.0.1", port)) as listener:
        assert port_in_use(port)
        client = socket.create_connection(("127.0.0.1", port))
        served, _ = listener.accept()
        served.close()  # the server side closes first, so its end of the connection waits in TIME_WAIT
        time.sleep(0.2)
        client.close()
    assert any(c.status == psutil.CONN_TIME_WAIT and c.laddr.port == port
               for c in psutil.net_connections("tcp4")), "no TIME_WAIT connection to probe against"
    assert not port_in_use(port)


def test_two_stacks_cannot_share_one_redis_data_folder(tmp_path):
    held = lock_data_dir(tmp_path / "redis")
    try:
        with pytest.raises(StackError, match=r"in use by another taskmesh up \(pid \d+\).*--data-dir"):
            lock_data_dir(tmp_path / "redis")
    finally:
        held.close()
    lock_data_dir(tmp_path / "redis").close()  # free again once the first one is gone

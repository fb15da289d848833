"""taskmesh status, top and task progress against a real Redis and a real simulated GPU worker."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import select
import signal
import socket
import struct
import subprocess
import sys
import termios
import time

import pytest
from celery.exceptions import TimeLimitExceeded
from rich.console import Console

from taskmesh import create_app
from taskmesh.core.records import WorkerRecord
from taskmesh.hardware.simulated import SimulatedProvider
from taskmesh.observe.status import collect_status
from taskmesh.observe.top import render
from taskmesh.state.keys import PROGRESS
from taskmesh.state.registry import Registry

from .conftest import ROOT, wait_for_workers

HOST = socket.gethostname()
APP = "tests.apps.gpu_app"
TASK = "tests.apps.gpu_app.progressing"
GIB = 1024


def taskmesh_cli(*args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "taskmesh", *args], cwd=ROOT, capture_output=True, text=True, timeout=60,
        env={**os.environ, "COLUMNS": "160"},
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def frame_text(status: dict) -> str:
    console = Console(record=True, width=160)
    console.print(render(status))
    return console.export_text()


def queue_row(text: str, queue: str) -> tuple[int, int, int]:
    """(waiting, in flight, consumers) from a queue's row of the Queues table."""
    match = re.search(rf"│ {re.escape(queue)}\s+│\s+(\d+)\s+│\s+(\d+)\s+│[^│]+│\s+(\d+)\s+│", text)
    assert match, f"no row for queue {queue} in:\n{text}"
    return tuple(int(n) for n in match.groups())


def monitor_state(app, task_id: str):
    """The task as Flower sees it: celery.events.State fed from the event stream."""
    state = app.events.State()
    with app.connection_for_read() as conn:
        receiver = app.events.Receiver(conn, handlers={"*": state.event})
        for _ in receiver.itercapture(limit=None, timeout=10, wakeup=False):
            task = state.tasks.get(task_id)
            if task is not None and task.state == "PROGRESS":
                return task
    raise AssertionError("no task-progress event arrived")


def wait_until(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        assert time.monotonic() < deadline, what
        time.sleep(0.2)
    return value


@pytest.mark.slow
def test_status_and_top_show_a_busy_gpu_with_its_task_progress_eta_and_queue(gpu_app, broker, processes):
    processes.taskmesh("-A", APP, "worker", "--profile", "gpu", "--loglevel", "WARNING",
                       env={"TASKMESH_SIMULATE_GPUS": "1x24GiB"})
    node = f"gpu0@{HOST}"
    wait_for_workers(gpu_app.app, [node])
    model = SimulatedProvider("1x24GiB").snapshot()[0].name
    running = gpu_app.progressing.delay(48, 0.5)

    def reported() -> dict | None:
        status = collect_status(gpu_app.app)
        tasks = [t for gpu in status["gpus"] for t in gpu["tasks"] if t["id"] == running.id]
        return status if tasks and tasks[0]["progress"] else None

    wait_until(reported, 30, "the running task's progress never showed in the status")
    queued = [gpu_app.progressing.delay(2, 0.1) for _ in range(2)]
    assert running.state == "PROGRESS"
    assert running.info["total"] == 48 and running.info["done"] >= 1
    monitored = monitor_state(gpu_app.app, running.id)
    assert monitored.state == "PROGRESS" and monitored.total == 48 and monitored.done >= 1

    data = json.loads(taskmesh_cli("-A", APP, "status", "--json"))
    (gpu,) = data["gpus"]
    assert (gpu["node"], gpu["model"], gpu["state"]) == (node, model, "busy")
    assert (gpu["memory_total_mib"], gpu["memory_reserved_mib"]) == (24 * GIB, 4 * GIB)
    (task,) = gpu["tasks"]
    assert (task["id"], task["task"]) == (running.id, TASK)
    assert task["progress"]["total"] == 48 and 1 <= task["progress"]["done"] < 48
    assert task["eta_s"] > 0
    queue = next(q for q in data["queues"] if q["name"] == "gpu")
    assert queue["waiting"] == 2 and queue["in_flight"] == 1 and queue["consumers"] == 1
    assert next(w for w in data["workers"] if w["node"] == node)["running"] == 1

    status = collect_status(gpu_app.app)
    done = status["gpus"][0]["tasks"][0]["progress"]["done"]
    text = frame_text(status)
    assert model in text and "busy" in text and TASK in text and f"{done}/48" in text
    assert queue_row(text, "gpu") == (2, 1, 1)

    frame = taskmesh_cli("-A", APP, "top", "--once")
    assert model in frame and "busy" in frame and TASK in frame
    shown = int(re.search(r"(\d+)/48 ", frame).group(1))
    assert done <= shown < 48
    assert queue_row(frame, "gpu") == (2, 1, 1)

    assert running.get(timeout=60) == 48 and [r.get(timeout=60) for r in queued] == [2, 2]
    wait_until(lambda: broker.hlen(PROGRESS) == 0, 10, "progress entries outlived their tasks")
    # The worker's state is announced by its heartbeat: one announced between two tasks also says idle
    # (with fewer done), so wait for the state announced after the last one.
    idle = wait_until(lambda: (s := collect_status(gpu_app.app))["gpus"][0]["state"] == "idle"
                      and s["gpus"][0]["tasks_done"] == 3 and s, 10, "the GPU did not show idle after its tasks ended")
    assert not idle["gpus"][0]["tasks"] and idle["gpus"][0]["idle_s"] >= 0
    assert not idle["progress"]

    killed = gpu_app.progressing.apply_async((100, 0.2), time_limit=3)
    wait_until(lambda: broker.hexists(PROGRESS, killed.id), 30, "the time-limited task never reported progress")
    with pytest.raises(TimeLimitExceeded):
        killed.get(timeout=60)
    wait_until(lambda: not broker.hexists(PROGRESS, killed.id), 10, "a killed task's progress entry was left")


def test_rebalance_runs_alerts_and_counters_written_by_hand_show_in_json_and_frame(broker_url, broker):
    now = time.time()
    alert = {"name": "gpu:no_consumer", "queue": "gpu", "kind": "no_consumer",
             "message": "12 tasks wait on gpu and no worker consumes it", "since": now - 95}
    broker.hset("taskmesh:alerts", alert["name"], json.dumps(alert))
    acted = {"at": now - 40, "acted": True, "skipped": None, "depths": {},
             "decisions": [{"action": "move_consumer", "target": "cpu_intensive", "why": "oldest task waited 95s"}],
             "hints": {"cpu": 3}}
    quiet = {"at": now - 10, "acted": False, "skipped": "cooldown", "depths": {}, "decisions": [],
             "hints": {"cpu": 3, "gpu0": 1}}
    broker.lpush("taskmesh:rebalance:runs", json.dumps(acted), "not json", json.dumps(quiet))
    broker.hincrby("taskmesh:counters", "rebalance_actions", 1)
    broker.hincrby("taskmesh:counters", "alerts_raised", 1)
    Registry(broker).announce(
        WorkerRecord("cpu@box", "1", "box", ("cpu_intensive",), (), 8, 16 * GIB),
        state={"paused": False, "reasons": {}, "held": 0, "running": 1, "gpus": []},
    )
    crunching = {"done": 30, "total": 100, "started": now - 60, "updated": now,
                 "task": "app.crunch", "worker": "cpu@box"}
    broker.hset(PROGRESS, "t-1", json.dumps(crunching))

    status = collect_status(create_app("status-test", broker=broker_url), now=now)
    assert json.loads(json.dumps(status)) == status
    assert status["alerts"] == [alert]
    assert [run["skipped"] for run in status["rebalance"]["runs"]] == ["cooldown", None]
    assert status["rebalance"]["last_action"] == acted and status["rebalance"]["hints"] == {"cpu": 3, "gpu0": 1}
    assert {g["group"]: (g["alive"], g["desired"]) for g in status["groups"]} == {"cpu": (1, 3), "gpu0": (0, 1)}
    (progress,) = status["progress"]
    assert (progress["id"], progress["task"], progress["worker"]) == ("t-1", "app.crunch", "cpu@box")
    assert progress["progress"]["percent"] == 30.0 and progress["eta_s"] == pytest.approx(140.0)
    assert next(q for q in status["queues"] if q["name"] == "cpu_intensive")["consumers"] == 1
    assert status["counters"]["rebalance_actions"] == 1 and status["counters"]["queue_full"] == 0

    text = frame_text(status)
    assert alert["message"] in text and "no_consumer" in text
    assert "last run 10s ago: no action (cooldown)" in text
    assert "move_consumer cpu_intensive: oldest task waited 95s" in text
    assert "cpu → 3" in text and "rebalance_actions 1" in text
    assert re.search(r"cpu@box\s+│ app.crunch\s+│ \S+\s+│ 30/100 30%\s+│ 2m20s", text), text
    assert alert["message"] in taskmesh_cli("status")


def drain(fd: int) -> bytes:
    if not select.select([fd], [], [], 0.2)[0]:
        return b""
    try:
        return os.read(fd, 65536)
    except OSError:  # EIO once the program has closed the terminal
        return b""


def test_top_redraws_until_q_and_quits_cleanly_on_ctrl_c(broker_url):
    for stop in (b"q", signal.SIGINT):
        controller, terminal = pty.openpty()
        fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 160, 0, 0))
        proc = subprocess.Popen([sys.executable, "-m", "taskmesh", "top", "--interval", "0.2"], cwd=ROOT,
                                stdin=terminal, stdout=terminal, stderr=terminal, start_new_session=True)
        os.close(terminal)
        try:
            seen = b""
            deadline = time.monotonic() + 30
            while seen.count(b"Queues") < 2:  # two frames: it redraws
                assert time.monotonic() < deadline and proc.poll() is None, seen.decode(errors="replace")
                seen += drain(controller)
            if stop == b"q":
                os.write(controller, stop)
            else:
                proc.send_signal(stop)
            while proc.poll() is None and time.monotonic() < deadline + 15:
                drain(controller)  # a full terminal buffer would block it mid-frame
            assert proc.wait(1) == 0
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
            os.close(controller)


def _ignore_sigint_on_its_own_terminal() -> None:
    """As a shell's ``cmd &`` leaves it: SIGINT ignored; the pty made the controlling
    terminal (after start_new_session's setsid) so that the Ctrl-C byte raises SIGINT."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


def test_top_started_with_sigint_ignored_still_quits_on_ctrl_c(broker_url):
    controller, terminal = pty.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 160, 0, 0))
    proc = subprocess.Popen([sys.executable, "-m", "taskmesh", "top", "--interval", "0.2"], cwd=ROOT,
                            stdin=terminal, stdout=terminal, stderr=terminal, start_new_session=True,
                            preexec_fn=_ignore_sigint_on_its_own_terminal)
    os.close(terminal)
    try:
        seen = b""
        deadline = time.monotonic() + 30
        while seen.count(b"Queues") < 2:
            assert time.monotonic() < deadline and proc.poll() is None, seen.decode(errors="replace")
            seen += drain(controller)
        os.write(controller, b"\x03")  # Ctrl-C typed at its terminal
        deadline = time.monotonic() + 20
        while proc.poll() is None and time.monotonic() < deadline:
            drain(controller)
        assert proc.poll() == 0, "top ignored Ctrl-C"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        os.close(controller)


def test_progress_with_a_bad_total_names_the_task_and_the_fix(gpu_app):
    with pytest.raises(ValueError, match=r"progressing: self.progress\(done=1, total=0\): total must be above 0"):
        gpu_app.progressing.progress(1, 0)
    with pytest.raises(TypeError, match="must be finite numbers"):
        gpu_app.progressing.progress("1", 10)

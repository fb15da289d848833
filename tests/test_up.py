"""``taskmesh up``: the whole stack starts, the demo completes, and nothing is left behind."""

from __future__ import annotations

import os
import pty
import signal
import stat
import subprocess
import sys
import time
import uuid
from pathlib import Path

import psutil
import pytest
import redis
import requests

from taskmesh.run.credentials import read_credentials

from .conftest import ROOT, anonymous_reply, marked


def kill_leftovers(marker: str) -> None:
    for proc in marked(marker):
        proc.kill()


@pytest.mark.slow
def test_up_demo_runs_the_mixed_workload_and_leaves_no_process(processes):
    marker = uuid.uuid4().hex
    proc = processes.taskmesh("up", "--demo", env={"TASKMESH_TEST_MARKER": marker}, stdin=subprocess.DEVNULL,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=180)
        assert proc.returncode == 0, err
        assert "Flower is not kept up" in err
        last = err.strip().splitlines()[-1]
        assert last.startswith("taskmesh: demo finished: ") and " succeeded, 0 failed; stack stopped; its logs are " \
            "kept in " in last, last
        assert Path(last.rsplit(" ", 1)[-1]).is_dir()
        total = next(line for line in out.splitlines() if line.startswith("total"))
        assert total.endswith(" succeeded, 0 failed") and int(total.split()[1]) == int(total.split()[3]), total
        for queue in ("gpu", "cpu_intensive", "cpu_light", "mixed"):
            assert any(line.split()[:2] and line.split()[0] == queue for line in out.splitlines()), out
        assert "gevent / io@" in out and "prefork / gpu0@" in out
        assert "simulating 1x24GiB" in err
        assert marked(marker) == []
    finally:
        kill_leftovers(marker)


@pytest.mark.slow
def test_up_locks_redis_and_flower_with_secrets_out_of_argv_and_sigterm_stops_everything(processes, tmp_path):
    marker, redis_port = uuid.uuid4().hex, _free()
    proc = processes.taskmesh(
        "-A", "tests.apps.e2e_app", "up", "--redis-port", str(redis_port), "--flower-port",
        str(port := _free()), "--logdir", str(tmp_path),
        "--exporter-port", str(metrics_port := _free()), "--data-dir", str(tmp_path / "redis"),
        env={"TASKMESH_TEST_MARKER": marker, "TASKMESH_SIMULATE_GPUS": "1x24GiB", "FLOWER_BASIC_AUTH": "ops:s3cret"},
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        lines = []
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not any("Ctrl-C stops everything" in line for line in lines):
            lines.append(proc.stdout.readline())
        assert any(f"flower: http://127.0.0.1:{port}/  user ops, password in credentials" in line
                   for line in lines), lines
        assert len(marked(marker)) >= 7  # supervisor, redis, 4 workers (+ pool children), beat, flower
        credentials = tmp_path / "redis" / "credentials.env"
        assert any(f"credentials: {credentials} " in line for line in lines), lines
        assert stat.S_IMODE(credentials.stat().st_mode) == 0o600
        assert stat.S_IMODE((tmp_path / "redis" / "redis-users.conf").stat().st_mode) == 0o600
        found = read_credentials(tmp_path / "redis")
        password, url = found["TASKMESH_REDIS_PASSWORD"], found["TASKMESH_BROKER_URL"]
        assert len(password) >= 24 and url == f"redis://taskmesh:{password}@127.0.0.1:{redis_port}/0"
        assert found["FLOWER_BASIC_AUTH"] == "ops:s3cret"
        assert f"broker: redis://taskmesh:**@127.0.0.1:{redis_port}/0 (started here, login required)" in lines[0]
        assert not any(password in line for line in lines)
        assert anonymous_reply(redis_port, "SET", "injected", "1").startswith(b"-NOAUTH ")  # a local user
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(port=redis_port).set("taskmesh:injected", 1)
        with pytest.raises(redis.AuthenticationError):
            redis.Redis.from_url(f"redis://taskmesh:wrong@127.0.0.1:{redis_port}/0").ping()
        assert redis.Redis.from_url(url).ping()
        argvs = {p.pid: Path(f"/proc/{p.pid}/cmdline").read_bytes()
                 for p in psutil.Process(proc.pid).children(recursive=True)}
        names = b" ".join(argvs.values())
        assert b"redis-server" in names and b"flower" in names and b"worker" in names, argvs
        assert [pid for pid, argv in argvs.items() if password.encode() in argv or b"s3cret" in argv] == []
        url = f"http://127.0.0.1:{port}/api/workers"
        for _ in range(50):
            try:
                if requests.get(url, auth=("ops", "s3cret"), timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                time.sleep(0.2)
        assert requests.get(url, timeout=2).status_code == 401
        assert any(f"metrics: http://127.0.0.1:{metrics_port}/metrics" in line for line in lines), lines
        metrics, groups = "", ("gpu0", "cpu", "io", "mixed")
        for _ in range(50):
            try:
                metrics = requests.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=2).text
            except requests.ConnectionError:
                pass
            if all(f'taskmesh_worker_up{{group="{g}"' in metrics for g in groups):
                break
            time.sleep(0.2)
        assert all(f'taskmesh_worker_up{{group="{g}"' in metrics for g in groups), metrics
        proc.send_signal(signal.SIGTERM)
        proc.wait(90)
        assert proc.returncode == 0
        assert marked(marker) == []
        logs = {p.name: p.read_text(errors="replace") for p in tmp_path.glob("*.log")}
        assert {"redis.log", "flower.log", "beat.log", "exporter.log"} <= set(logs), sorted(logs)
        assert [name for name, text in logs.items() if password in text or "s3cret" in text] == []
    finally:
        kill_leftovers(marker)


def _free() -> int:
    from taskmesh.run.stack import free_port

    return free_port()


def test_up_says_what_to_do_when_redis_is_missing(tmp_path):
    out = subprocess.run([sys.executable, "-m", "taskmesh", "-A", "tests.apps.e2e_app", "up", "--no-flower"],
                         env={"PATH": str(tmp_path)}, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert "redis-server is not installed" in out.stderr and "--broker" in out.stderr


@pytest.mark.slow
def test_up_demo_on_a_terminal_keeps_flower_up_until_enter(processes):
    marker = uuid.uuid4().hex
    leader, follower = pty.openpty()
    proc = processes.taskmesh("up", "--demo", env={"TASKMESH_TEST_MARKER": marker}, stdin=follower,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    os.close(follower)
    try:
        lines: list[str] = []
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and not any("press Enter" in line for line in lines):
            lines.append(proc.stdout.readline())
        assert any("press Enter" in line for line in lines), "".join(lines)
        url = next(line for line in lines if line.startswith("flower:")).split()[1]
        folder = Path(next(line for line in lines if line.startswith("credentials:")).split()[1]).parent
        user, password = read_credentials(folder)["FLOWER_BASIC_AUTH"].split(":", 1)
        assert requests.get(url + "api/workers", auth=(user, password), timeout=10).status_code == 200
        time.sleep(2)
        assert proc.poll() is None  # still up, waiting for Enter
        os.write(leader, b"\n")
        rest, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0 and "stack stopped" in rest.strip().splitlines()[-1]
        assert marked(marker) == []
    finally:
        os.close(leader)
        kill_leftovers(marker)

"""Several hosts on one machine: Redis in a network namespace of its own, each worker host
in another with its own hostname and simulated GPUs, joined by veth pairs that this test
makes and removes. Only the namespaces' own addresses are ever connected to.

What a fleet relies on and one host cannot show: tasks routed by what each host's GPUs
can take, one ledger shared by every host, a dead host's tasks recovered on another, and
a host whose clock is ten minutes off not taken for dead.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
import redis

from taskmesh.core.claims import gpu_pool
from taskmesh.hardware.simulated import SimulatedProvider
from taskmesh.run.stack import wait_for_redis
from taskmesh.state.ledger import Ledger

from .conftest import Processes, bind, wait_for_workers, wait_until

APP = "tests.apps.gpu_app"
GIB = 1024
PORT = 6390  # inside the Redis namespace: no other process listens there
HOSTS = {"hosta": "1x24GiB", "hostb": "1x80GiB"}


def _can_make_namespaces() -> str | None:
    if sys.platform != "linux" or os.geteuid() != 0:
        return "network namespaces need root on Linux"
    if not (shutil.which("ip") and shutil.which("unshare")):
        return "needs ip (iproute2) and unshare (util-linux)"
    probe = f"tm{os.getpid()}p"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode:
        return f"cannot make a network namespace here: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], check=True)
    return None


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


class Lan:
    """Namespace ``r`` holds Redis; each host's namespace has a veth pair to it, and so has
    this test's own namespace, which sends the tasks and reads the ledger."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        pid = os.getpid()
        self.prefix = f"tm{pid}"
        n = pid % 512
        self.net = f"198.{18 + n // 256}.{n % 256}"  # the benchmarking range, RFC 2544: never a real peer
        self.namespaces: list[str] = []
        self.processes = Processes()
        self.urls: dict[str, str] = {}

    def link(self, name: str, index: int, namespace: str | None) -> str:
        """A /30 between Redis's namespace and *namespace* (None: this one); Redis's address on it."""
        here, there = f"{self.prefix}{name}0", f"{self.prefix}{name}1"
        redis_ip, peer_ip = f"{self.net}.{4 * index + 1}", f"{self.net}.{4 * index + 2}"
        ip("link", "add", here, "type", "veth", "peer", "name", there)
        ip("link", "set", here, "netns", self.ns("r"))
        run_in = ["-n", self.ns("r")]
        ip(*run_in, "addr", "add", f"{redis_ip}/30", "dev", here)
        ip(*run_in, "link", "set", here, "up")
        peer = ["-n", namespace] if namespace else []
        if namespace:
            ip("link", "set", there, "netns", namespace)
        ip(*peer, "addr", "add", f"{peer_ip}/30", "dev", there)
        ip(*peer, "link", "set", there, "up")
        return redis_ip

    def ns(self, name: str) -> str:
        return f"{self.prefix}{name}"

    def make(self) -> None:
        for name in ("r", *HOSTS):
            ip("netns", "add", self.ns(name))
            self.namespaces.append(self.ns(name))
            ip("-n", self.ns(name), "link", "set", "lo", "up")
        self.urls["test"] = f"redis://{self.link('t', 0, None)}:{PORT}/0"
        for index, host in enumerate(HOSTS, start=1):
            self.urls[host] = f"redis://{self.link(host[-1], index, self.ns(host))}:{PORT}/0"
        self.processes.start(["ip", "netns", "exec", self.ns("r"), "redis-server", "--port", str(PORT), "--bind",
                              "0.0.0.0", "--protected-mode", "no", "--save", "", "--appendonly", "no"],
                             stdout=subprocess.DEVNULL)
        wait_for_redis(self.urls["test"], timeout=10)

    def start_host(self, host: str, **env: str) -> subprocess.Popen[bytes]:
        """``taskmesh worker --profile gpu`` on *host*: its own namespace and hostname."""
        argv = ["ip", "netns", "exec", self.ns(host), "unshare", "--uts", "sh", "-c",
                f'hostname {host} && exec "$0" "$@"', sys.executable, "-m", "taskmesh", "-A", APP, "worker",
                "--profile", "gpu", "--loglevel", "WARNING"]
        with (self.logs / f"{host}.log").open("ab") as log:
            return self.processes.start(argv, {"TASKMESH_BROKER_URL": self.urls[host],
                                               "TASKMESH_SIMULATE_GPUS": HOSTS[host], **env},
                                        stdout=log, stderr=subprocess.STDOUT)

    def wait_for(self, app, host: str) -> None:
        """Its GPU worker answers ping (its log in the failure, if it does not)."""
        try:
            wait_for_workers(app, [f"gpu0@{host}"], timeout=120)
        except AssertionError as missing:
            log = (self.logs / f"{host}.log").read_text()[-3000:]
            raise AssertionError(f"{missing}; {host}'s log:\n{log}") from None

    def remove(self) -> None:
        self.processes.stop_all()
        for namespace in self.namespaces:  # a veth dies with its end in a namespace, and its peer with it
            subprocess.run(["ip", "netns", "del", namespace], capture_output=True)


@pytest.fixture
def lan(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Lan]:
    why = _can_make_namespaces()
    if why:
        pytest.skip(why)
    from tests.apps import gpu_app

    made, before = Lan(tmp_path), gpu_app.app.conf.broker_url
    try:
        made.make()
        monkeypatch.setenv("TASKMESH_BROKER_URL", made.urls["test"])
        bind(gpu_app, made.urls["test"])
        yield made
    finally:
        made.remove()
        bind(gpu_app, before)


def gpu_uuid(host: str) -> str:
    return SimulatedProvider(HOSTS[host], host=host).snapshot()[0].uuid


@pytest.mark.slow
def test_hosts_share_one_ledger_route_by_capability_survive_skew_and_recover_a_dead_host(lan):
    from tests.apps import gpu_app

    client = redis.Redis.from_url(lan.urls["test"])
    ledger, pools = Ledger(client), {h: gpu_pool(gpu_uuid(h)) for h in HOSTS}
    env = {"TASKMESH_RESERVATION_TTL_S": "6", "TASKMESH_DEAD_AFTER_S": "8"}

    def runs(task_id: str) -> int:
        return [r.decode() for r in client.lrange("test:runs", 0, -1)].count(task_id)

    lan.start_host("hosta", TASKMESH_TEST_CLOCK_SKEW_S="-600", **env)  # its clock ten minutes behind
    lan.wait_for(gpu_app.app, "hosta")
    skewed = gpu_app.twenty_gib.delay(12.0, label="skewed")  # outlives dead_after_s; fills hosta's one slot
    wait_until(lambda: ledger.used([pools["hosta"]])[pools["hosta"]] == 20 * GIB, timeout=30, what="hosta busy")
    host_b = lan.start_host("hostb", TASKMESH_GPU_SLOTS="2", **env)
    lan.wait_for(gpu_app.app, "hostb")

    big = gpu_app.forty_gib.delay(2.0, label="big")  # fits only hostb's 80 GiB GPU
    doomed = gpu_app.ten_gib.delay(15.0, label="doomed")  # hostb's second slot: hosta has no free slot
    wait_until(lambda: ledger.used(list(pools.values())) == {pools["hosta"]: 20 * GIB, pools["hostb"]: 50 * GIB},
               timeout=30, what="both hosts' reservations in the one ledger")
    assert big.get(timeout=60)["node"] == "gpu0@hostb"

    supervisor = psutil.Process(host_b.pid)
    for proc in [supervisor, *supervisor.children(recursive=True)]:
        proc.send_signal(signal.SIGKILL)  # hostb dies whole, doomed half run
    assert skewed.get(timeout=60)["node"] == "gpu0@hosta"
    assert runs(skewed.id) == 1  # hostb, which recovers dead workers, never took skewed hosta for dead
    recovered = doomed.get(timeout=90)
    assert recovered["node"] == "gpu0@hosta" and runs(doomed.id) == 2  # its first run died with hostb
    wait_until(lambda: ledger.used(list(pools.values())) == {pools["hosta"]: 0, pools["hostb"]: 0}, timeout=30,
               what="the dead host's reservation to expire and the ledger to match what runs: nothing")

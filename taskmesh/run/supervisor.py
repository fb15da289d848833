"""A small process supervisor for the stack's children (workers, beat, Flower, Redis).

Celery's own ``multi`` daemonises and forgets; an operator running ``taskmesh up``
in a terminal or a container wants the opposite: children in the foreground, a
crashed worker restarted with backoff and reported, and Ctrl-C or SIGTERM that stops
everything — warm shutdown first, a kill after the grace period — leaving no
process behind.

Each child gets its own session (process group) so that a terminal's Ctrl-C reaches
only the supervisor, which then stops all children together, the Redis broker last
(workers drain to it), and so that a worker's pool processes can be
killed together by group id if it will not stop.

A supervisor that is itself killed (SIGKILL, the OOM killer) cannot stop anything, so
on Linux each child is also armed with a parent-death signal: the kernel sends it
SIGTERM, the same warm shutdown, when the supervisor goes, and no orphan keeps a port.
"""

from __future__ import annotations

import ctypes
import dataclasses
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

MAX_BACKOFF_S = 30.0
STABLE_AFTER_S = 60.0
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


@dataclasses.dataclass(frozen=True)
class ProcessSpec:
    name: str
    argv: Sequence[str]
    env: Mapping[str, str] | None = None
    restart: bool = True
    stop_last: bool = False  # the broker: stopped after everything that drains to it


@dataclasses.dataclass
class _Child:
    spec: ProcessSpec
    proc: subprocess.Popen[bytes] | None = None
    log: IO[bytes] | None = None
    restarts: int = 0
    started_at: float = 0.0
    restart_at: float | None = None


def _say(message: str) -> None:
    print(f"taskmesh: {message}", file=sys.stderr, flush=True)


class Supervisor:
    """Start children, restart the ones that die, stop them all on request."""

    def __init__(
        self,
        logdir: Path | None = None,
        grace_s: float = 30.0,
        report: Callable[[str], None] = _say,
    ) -> None:
        self.logdir = logdir
        self.grace_s = grace_s
        self.report = report
        self.children: list[_Child] = []
        self._stopping = False
        self._signals = 0

    def add(self, spec: ProcessSpec) -> subprocess.Popen[bytes]:
        child = _Child(spec)
        self.children.append(child)
        self._spawn(child)
        assert child.proc is not None
        return child.proc

    def _spawn(self, child: _Child) -> None:
        out: IO[bytes] | int | None = None
        if self.logdir is not None:
            self.logdir.mkdir(parents=True, exist_ok=True)
            child.log = child.log or open(self.logdir / f"{child.spec.name}.log", "ab")  # noqa: SIM115
            out = child.log
        child.proc = subprocess.Popen(
            list(child.spec.argv),
            env=dict(child.spec.env) if child.spec.env is not None else None,
            stdout=out,
            stderr=subprocess.STDOUT if out is not None else None,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            preexec_fn=_parent_death_signal(),
        )
        child.started_at = time.monotonic()
        child.restart_at = None

    def poll(self) -> None:
        """Notice exits and restart due children; call this regularly."""
        now = time.monotonic()
        for child in self.children:
            proc = child.proc
            if proc is not None and proc.poll() is not None:
                _kill_group(proc.pid)
                child.proc = None
                if self._stopping or not child.spec.restart:
                    self.report(f"{child.spec.name} (pid {proc.pid}) exited with code {proc.returncode}")
                    continue
                if now - child.started_at > STABLE_AFTER_S:
                    child.restarts = 0
                delay = min(MAX_BACKOFF_S, 2.0**child.restarts)
                child.restarts += 1
                child.restart_at = now + delay
                self.report(
                    f"{child.spec.name} (pid {proc.pid}) exited with code {proc.returncode}; "
                    f"restart {child.restarts} in {delay:.0f}s"
                )
            elif child.proc is None and child.restart_at is not None and now >= child.restart_at:
                self._spawn(child)
                self.report(f"{child.spec.name} restarted (pid {child.proc.pid})")

    def install_signal_handlers(self) -> None:
        def on_signal(signum: int, _frame: object) -> None:
            self._signals += 1
            self._stopping = True
            if self._signals > 1:
                self.report("second signal: killing children now")
                self.grace_s = 0

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)

    @property
    def stopping(self) -> bool:
        return self._stopping

    def wait(self, timeout: float | None = None, interval: float = 0.2) -> None:
        """Supervise until a signal arrives (or *timeout* seconds pass)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._stopping and (deadline is None or time.monotonic() < deadline):
            self.poll()
            time.sleep(interval)

    def stop(self) -> None:
        """Warm shutdown (SIGTERM) of all children at once, the broker after the rest."""
        self._stopping = True
        for last in (False, True):
            tier = [c for c in self.children if c.spec.stop_last is last and c.proc is not None]
            for child in tier:
                if child.proc.poll() is None:
                    child.proc.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + self.grace_s
            while any(c.proc.poll() is None for c in tier) and time.monotonic() < deadline:
                time.sleep(0.1)
            for child in tier:
                if child.proc.poll() is None:
                    self.report(f"{child.spec.name} did not stop in {self.grace_s:.0f}s; killing it")
                _kill_group(child.proc.pid)
                child.proc.wait()
        for child in self.children:
            if child.log is not None:
                child.log.close()


def stop_process(proc: subprocess.Popen[Any], grace_s: float = 30.0) -> None:
    """SIGTERM (warm shutdown), wait, then SIGKILL what is left of its process group."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            pass
    _kill_group(proc.pid)
    if proc.poll() is None:
        proc.wait(10)


def _parent_death_signal() -> Callable[[], None] | None:
    """A ``preexec_fn`` that makes the kernel SIGTERM the child when this process dies.

    Linux only, and only from the main thread: the signal fires when the *thread* that
    forked exits, so a child forked by a short-lived thread would be stopped with it.
    ``prctl`` is looked up here, before the fork, so that the child only calls it.
    """
    if not sys.platform.startswith("linux") or threading.current_thread() is not threading.main_thread():
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    parent = os.getpid()

    def arm() -> None:
        prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        if os.getppid() != parent:  # the supervisor died between fork and prctl: nobody to signal us
            os._exit(1)

    return arm


def _kill_group(pgid: int) -> None:
    """Kill what is left of a child's process group (orphaned pool processes)."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass

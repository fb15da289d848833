"""``taskmesh up``: the whole local stack on this machine, in the foreground.

Redis (unless a broker is given), the worker groups this hardware supports, beat
and Flower, under one supervisor. Redis listens on loopback only, with no anonymous
access (an ACL user with a generated password), and Flower is started with basic-auth
credentials; both are kept in files only their owner reads and reach the processes by
environment and file, never argv (``run.credentials``): a local stack should not be an
open door on a shared machine. Every URL printed is redacted.

The Redis started here keeps an append-only file (fsync every second) in a data
folder the user can find (``./.taskmesh/redis`` unless ``--data-dir`` says
otherwise), and the supervisor restarts it if it dies: queued tasks, results and the
GPU ledger survive a Redis restart. A crash of the *host* can lose up to the last
second of acknowledged writes, the trade-off Redis documents for ``everysec``.
"""

from __future__ import annotations

import dataclasses
import fcntl
import os
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import IO, Any

from taskmesh.app.celery_app import BROKER_ENV
from taskmesh.core.redact import redacted
from taskmesh.run.credentials import ACL_FILE, FLOWER_KEY, read_credentials, stack_secrets, write_secrets
from taskmesh.run.supervisor import ProcessSpec, Supervisor
from taskmesh.run.workers import WorkerSpec


class StackError(RuntimeError):
    """The stack cannot start as asked; the message says what to change."""


@dataclasses.dataclass(frozen=True)
class StackOptions:
    app_path: str
    broker: str | None = None
    redis_port: int = 6379
    flower: bool = True
    flower_port: int = 5555
    flower_auth: str | None = None
    exporter_port: int = 9808
    beat: bool = True
    logdir: Path | None = None
    loglevel: str = "INFO"
    data_dir: Path | None = None  # None: a fresh folder under the logs (the demo's throwaway Redis)


DEFAULT_DATA_DIR = Path(".taskmesh") / "redis"


def _probe() -> socket.socket:
    """A socket that binds as the servers it stands in for do (Redis, Flower, the exporter
    all set SO_REUSEADDR): a port whose last connections wait in TIME_WAIT after a clean
    stop is free to them, so it must be free here too; a listening one still is not."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    return sock


def free_port() -> int:
    with _probe() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def port_in_use(port: int) -> bool:
    with _probe() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


def redis_command(port: int, data_dir: Path | None, config: Path | None = None) -> list[str]:
    """redis-server on loopback: with an append-only file in *data_dir*, or (``None``: a
    throwaway server, as the benchmarks use) with no persistence at all. *config* is a
    file redis-server reads first (``up``'s ACL): what is secret stays out of argv."""
    server = shutil.which("redis-server")
    if server is None:
        raise StackError(
            "redis-server is not installed; install it (Debian/Ubuntu: sudo apt-get install redis-server) "
            "or pass --broker redis://HOST:PORT/0 to use a running one"
        )
    if port_in_use(port):
        raise StackError(
            f"port {port} on 127.0.0.1 is in use; pass --redis-port with a free port, "
            f"or --broker redis://127.0.0.1:{port}/0 if that is a Redis you want to use"
        )
    head = [server] if config is None else [server, str(config)]
    if data_dir is None:
        return [*head, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    return [
        *head, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(data_dir),
        "--appendonly", "yes", "--appendfsync", "everysec", "--save", "",
    ]


def lock_data_dir(data_dir: Path) -> IO[str]:
    """Hold *data_dir* for this ``up`` (released when the process ends, however it ends):
    two Redis servers writing one append-only file would corrupt it."""
    data_dir.mkdir(parents=True, exist_ok=True)
    lock = open(data_dir / "taskmesh-up.lock", "a+")  # noqa: SIM115 - held for the life of the stack
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        holder = lock.read().strip() or "another process"
        lock.close()
        raise StackError(
            f"the Redis data folder {data_dir} is in use by another taskmesh up (pid {holder}); "
            "stop that one or pass --data-dir with another folder"
        ) from None
    lock.truncate(0)
    lock.write(str(os.getpid()))
    lock.flush()
    return lock


def check_flower_auth(auth: str | None) -> None:
    """Refuse a malformed ``user:password`` for Flower's basic auth (``None``: one is generated).

    Checked before anything starts: Flower takes a value without a password and then
    lets nobody in (or, with ``user:``, anybody who knows the user), and it reads a
    comma as a list of logins.
    """
    if auth is None:
        return
    user, colon, password = auth.partition(":")
    problem = (
        "it has no ':'" if not colon
        else "the user is empty" if not user
        else "the password is empty" if not password
        else "it contains ',' (Flower reads that as several logins)" if "," in auth
        else None
    )
    if problem:
        raise StackError(f"--flower-auth must be user:password, e.g. --flower-auth ops:s3cret; {problem}")


def wait_for_redis(url: str, timeout: float = 15.0) -> None:
    import redis

    from taskmesh.state.client import client_from_url

    deadline = time.monotonic() + timeout
    while True:
        try:
            client_from_url(url, socket_timeout=1).ping()
            return
        except redis.ConnectionError:
            if time.monotonic() > deadline:
                raise StackError(f"Redis at {redacted(url)} did not answer within {timeout:.0f}s") from None
            time.sleep(0.1)


class Stack:
    """Owns the supervisor and knows what was started, for ``up`` and the demo."""

    def __init__(self, options: StackOptions) -> None:
        self.options = options
        if options.flower:
            check_flower_auth(options.flower_auth)
        if options.flower and port_in_use(options.flower_port):
            raise StackError(f"port {options.flower_port} on 127.0.0.1 is in use; pass --flower-port")
        self.logdir = options.logdir or Path(tempfile.mkdtemp(prefix="taskmesh-up-"))
        self.supervisor = Supervisor(logdir=self.logdir)
        self.data_dir = (options.data_dir or self.logdir / "redis").resolve()
        self.broker_url = options.broker or os.environ.get(BROKER_ENV)
        # a shell that loaded this stack's credentials.env still means "start this stack's Redis"
        self.owns_redis = self.broker_url is None or (
            options.broker is None and self.broker_url == read_credentials(self.data_dir).get(BROKER_ENV))
        secrets_dir = self.data_dir if self.owns_redis else self.logdir
        self.secrets = stack_secrets(secrets_dir, options.flower_auth if options.flower else None)
        if self.owns_redis:
            self.broker_url = self.secrets.broker_url(options.redis_port)
        self.env = {**os.environ, BROKER_ENV: self.broker_url}
        self.env.pop(FLOWER_KEY, None)  # Flower's alone
        self.nodenames: list[str] = []
        self._data_lock: IO[str] | None = None
        self.credentials_file: Path | None = None

    def start_broker(self) -> None:
        os.environ[BROKER_ENV] = self.broker_url
        if self.owns_redis:
            self._data_lock = lock_data_dir(self.data_dir)
        self.credentials_file = write_secrets(self.data_dir if self.owns_redis else self.logdir, self.secrets,
                                              self.broker_url, self.owns_redis)
        if self.owns_redis:
            argv = redis_command(self.options.redis_port, self.data_dir, self.credentials_file.with_name(ACL_FILE))
            self.supervisor.add(ProcessSpec("redis", argv, stop_last=True))
        try:
            wait_for_redis(self.broker_url)
        except StackError as exc:
            raise StackError(f"{exc}; see {self.logdir / 'redis.log'}" if self.owns_redis else str(exc)) from None

    def start_services(self, workers: list[WorkerSpec]) -> None:
        options = self.options
        celery = [sys.executable, "-m", "celery", "-A", options.app_path]
        for spec in workers:
            argv = spec.argv(options.app_path, options.loglevel)
            self.supervisor.add(ProcessSpec(spec.group, argv, spec.environ(self.env)))
            self.nodenames.append(spec.nodename)
        if options.beat:
            schedule = self.logdir / "celerybeat-schedule"
            argv = celery + ["beat", "-s", str(schedule), "--loglevel", options.loglevel]
            self.supervisor.add(ProcessSpec("beat", argv, self.env))
        if options.flower:
            argv = celery + [
                "flower",
                "--address=127.0.0.1",
                f"--port={options.flower_port}",
            ]  # the login by environment (Flower reads FLOWER_<OPTION>): argv is public
            self.supervisor.add(ProcessSpec("flower", argv, {**self.env, FLOWER_KEY: self.secrets.flower_auth}))
        if port_in_use(options.exporter_port):
            raise StackError(f"port {options.exporter_port} on 127.0.0.1 is in use; pass --exporter-port")
        argv = [sys.executable, "-m", "taskmesh", "-A", options.app_path, "exporter", f"--port={options.exporter_port}"]
        self.supervisor.add(ProcessSpec("exporter", argv, self.env))

    def wait_until_ready(self, app: Any, timeout: float = 90.0) -> None:
        """Return once every worker answers ping; a supervisor signal aborts the wait."""
        deadline = time.monotonic() + timeout
        waiting = set(self.nodenames)
        while waiting:
            self.supervisor.poll()
            if self.supervisor.stopping:
                raise StackError("stopped before the workers were ready")
            if time.monotonic() > deadline:
                raise StackError(
                    f"workers {sorted(waiting)} did not answer ping within {timeout:.0f}s; see logs in {self.logdir}"
                )
            replies = app.control.ping(destination=sorted(waiting), timeout=1.0) or []
            for reply in replies:
                waiting -= set(reply)

    def describe(self) -> str:
        here = " (started here, login required)" if self.owns_redis else ""
        lines = [f"broker: {redacted(self.broker_url)}{here}"]
        if self.owns_redis:
            lines.append(f"redis data: {self.data_dir} (append-only file, fsync every second)")
        lines.append(f"credentials: {self.credentials_file} (mode 600; load with: set -a; . FILE; set +a)")
        lines += [f"worker: {name}" for name in self.nodenames]
        if self.options.flower:
            user = self.secrets.flower_auth.split(":", 1)[0]
            lines.append(f"flower: http://127.0.0.1:{self.options.flower_port}/  user {user}, password in credentials")
        lines.append(f"metrics: http://127.0.0.1:{self.options.exporter_port}/metrics")
        lines.append(f"logs: {self.logdir}")
        return "\n".join(lines)

    def stop(self) -> None:
        self.supervisor.stop()
        if self._data_lock is not None:
            self._data_lock.close()

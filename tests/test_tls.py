"""taskmesh over TLS: a local ``redis-server`` that listens only on a TLS port, with a CA and a
server certificate this test makes, reached with Celery's documented spellings and
``CERT_REQUIRED`` — by taskmesh's own clients and by a real worker running a GPU task."""

from __future__ import annotations

import importlib
import shutil
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from taskmesh import create_app
from taskmesh.run.stack import free_port
from taskmesh.state.client import client_from_url

from .certs import make_ca, make_server_cert, pem
from .conftest import wait_for_workers


class TlsRedis:
    def __init__(self, port: int, ca: Path, wrong_ca: Path) -> None:
        self.port, self.ca, self.wrong_ca = port, ca, wrong_ca

    def url(self, ca: Path | None = None) -> str:
        """The broker URL as Celery's documentation spells it."""
        return f"rediss://127.0.0.1:{self.port}/0?ssl_cert_reqs=CERT_REQUIRED&ssl_ca_certs={ca or self.ca}"


@pytest.fixture(scope="module")
def tls_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsRedis]:
    server = shutil.which("redis-server")
    if server is None:
        pytest.fail("redis-server is not installed; scripts/test installs it (apt-get install redis-server)")
    folder = tmp_path_factory.mktemp("tls")
    ca, cert, key = make_server_cert(folder)
    wrong_ca = folder / "other-ca.pem"
    wrong_ca.write_bytes(pem(make_ca("someone else's CA")[1]))
    port = free_port()
    proc = subprocess.Popen(
        [server, "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1", "--tls-cert-file", str(cert),
         "--tls-key-file", str(key), "--tls-ca-cert-file", str(ca), "--tls-auth-clients", "no",
         "--save", "", "--appendonly", "no"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    found = TlsRedis(port, ca, wrong_ca)
    deadline = time.monotonic() + 10
    while True:
        try:  # redis-py's own spelling: the fixture does not depend on the factory under test
            redis.Redis("127.0.0.1", port, ssl=True, ssl_ca_certs=str(ca), ssl_cert_reqs="required").ping()
            break
        except redis.ConnectionError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"redis-server with TLS did not start: {proc.communicate()[0][-2000:]}")
            time.sleep(0.05)
    yield found
    proc.terminate()
    proc.wait(10)


def test_taskmesh_clients_reach_a_tls_redis_with_cert_required_and_a_wrong_ca_is_refused(tls_redis):
    url = tls_redis.url()
    with pytest.raises(redis.RedisError, match="CERT_REQUIRED"):
        redis.Redis.from_url(url).ping()  # redis-py alone refuses Celery's documented spelling
    assert client_from_url(url).ping()
    app = create_app("tls-producer", broker=url)
    assert app.redis().ping()  # the producer's checks, the ledger and the registry all use this factory
    with pytest.raises(redis.ConnectionError, match="certificate verify failed"):
        client_from_url(tls_redis.url(tls_redis.wrong_ca)).ping()
    with pytest.raises(redis.ConnectionError):  # a client that does not speak TLS gets nothing
        redis.Redis(port=tls_redis.port, socket_timeout=2).ping()
    # broker_use_ssl, with ssl.CERT_REQUIRED as Celery's documentation writes it, turns TLS on for redis://
    settings = {"ssl_cert_reqs": ssl.CERT_REQUIRED, "ssl_ca_certs": str(tls_redis.ca)}
    assert create_app("tls-dict", broker=f"redis://127.0.0.1:{tls_redis.port}/0",
                      broker_use_ssl=settings).redis().ping()
    wrong = create_app("tls-wrong", broker=f"redis://127.0.0.1:{tls_redis.port}/0",
                       broker_use_ssl={**settings, "ssl_ca_certs": str(tls_redis.wrong_ca)})
    with pytest.raises(redis.ConnectionError, match="certificate verify failed"):
        wrong.redis().ping()


def test_a_redis_url_with_tls_parameters_but_no_tls_is_refused_naming_the_fix():
    with pytest.raises(ValueError, match=r"not rediss://: start it with rediss://"):
        client_from_url("redis://127.0.0.1:1/0?ssl_cert_reqs=CERT_REQUIRED")
    with pytest.raises(ValueError, match="ssl_cert_reqs='sometimes' is not one of CERT_REQUIRED"):
        client_from_url("rediss://127.0.0.1:1/0?ssl_cert_reqs=sometimes")


@pytest.mark.slow
def test_a_worker_runs_a_gpu_task_over_tls_with_cert_required(tls_redis, processes, monkeypatch):
    url = tls_redis.url()
    monkeypatch.setenv("TASKMESH_BROKER_URL", url)
    sys.modules.pop("tests.apps.tls_app", None)
    tls_app = importlib.import_module("tests.apps.tls_app")
    try:
        client_from_url(url).flushall()
        worker = processes.taskmesh("-A", "tests.apps.tls_app", "worker", "--profile", "gpu", "--loglevel", "WARNING",
                                    env={"TASKMESH_SIMULATE_GPUS": "1x24GiB"})
        wait_for_workers(tls_app.app, [f"gpu0@{socket.gethostname()}"], timeout=90)
        ran = tls_app.reserved.delay().get(timeout=60)
        assert len(ran["gpu_uuids"]) == 1 and ran["reserved_mib"] == 10 * 1024, ran
        processes.stop(worker)
    finally:
        sys.modules.pop("tests.apps.tls_app", None)

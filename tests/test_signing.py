"""Celery's message signing with taskmesh: a signed GPU task keeps its taskmesh header and is
admitted against the ledger; an unsigned one is refused by the worker, never run, with a fix
that names the sender's settings; the remote-control mailbox is signed as well."""

from __future__ import annotations

import json
import socket
import subprocess
import sys

import pytest

from taskmesh.state.keys import DEAD_LETTERS

from .certs import make_signing_pair
from .conftest import ROOT

SIGNED = "tests.apps.signed_app"


def produce(code: str, env: dict[str, str]) -> str:
    """Run producer *code* in its own process: ``setup_security`` changes kombu's
    serializer registry for the whole process, which must not leak into the test session."""
    done = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


@pytest.mark.slow
def test_a_signed_gpu_task_is_admitted_and_an_unsigned_one_is_refused(broker_url, broker, processes, tmp_path):
    make_signing_pair(tmp_path)
    env = {"PATH": "/usr/bin:/bin", "TASKMESH_BROKER_URL": broker_url, "TASKMESH_TEST_SIGNING": str(tmp_path),
           "TASKMESH_SIMULATE_GPUS": "1x24GiB"}
    processes.taskmesh("-A", SIGNED, "worker", "--profile", "gpu", "--loglevel", "WARNING", env=env)
    from taskmesh import create_app

    watcher = create_app("watcher", broker=broker_url)
    unsigned = produce(
        "from taskmesh import create_app\n"
        f"print(create_app('plain').send_task('{SIGNED}.reserved', ('unsigned',), queue='gpu').id)", env)
    signed = produce(
        f"import json\nfrom {SIGNED} import reserved\n"
        "print(json.dumps(reserved.delay('signed').get(timeout=90)))", env)
    assert json.loads(signed) == {"label": "signed", "reserved_mib": 10 * 1024}
    # the unsigned message was sent first, on the same queue, to the only worker: it was refused, not run
    assert [r.decode() for r in broker.lrange("test:signed-runs", 0, -1)] == ["signed"]
    refused = watcher.AsyncResult(unsigned)  # refused with the reason and the fix, kept in the dead letters
    assert refused.state == "FAILURE" and type(refused.result).__name__ == "MessageRefused"
    assert "ContentDisallowed" in str(refused.result) and "this worker accepts only auth messages" in str(
        refused.result), refused.result
    assert broker.hexists(DEAD_LETTERS, unsigned)
    # the control mailbox is signed too: the worker answers a signed ping, and not an unsigned one
    node = f"gpu0@{socket.gethostname()}"
    answered = produce(f"from {SIGNED} import app\nprint(app.control.ping(destination=['{node}'], timeout=3))", env)
    assert node in answered, answered
    assert watcher.control.ping(destination=[node], timeout=3) == []

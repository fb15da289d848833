"""A GPU task whose messages are signed (Celery's ``task_serializer="auth"``); the key,
certificate and store come from ``TASKMESH_TEST_SIGNING`` (a folder the test fills)."""

from __future__ import annotations

import os
from typing import Any

import redis

from taskmesh import create_app
from taskmesh.app.placement import current_placement
from taskmesh.core.claims import gpu_pool
from taskmesh.state.ledger import Ledger

FOLDER = os.environ.get("TASKMESH_TEST_SIGNING", "")
RUNS = "test:signed-runs"

app = create_app(
    "tests.apps.signed_app",
    task_serializer="auth",
    accept_content=["auth"],
    security_key=os.path.join(FOLDER, "signer.key"),
    security_certificate=os.path.join(FOLDER, "signer.pem"),
    security_cert_store=os.path.join(FOLDER, "*.pem"),
)
app.setup_security(allowed_serializers=["json"])  # results stay JSON; auth is registered by the call


@app.task(bind=True, profile="gpu", vram="10GiB", time_limit=60)
def reserved(self: Any, label: str) -> dict[str, Any]:
    """What the admission ledger holds for this task's GPU while it runs."""
    client: redis.Redis = app.redis()
    client.rpush(RUNS, label)
    pool = gpu_pool(current_placement().gpu_uuids[0])
    return {"label": label, "reserved_mib": Ledger(client).used([pool])[pool]}

"""A GPU task for the TLS tests: its broker (``TASKMESH_BROKER_URL``, a ``rediss://`` URL) is
read at import, so the test imports this module only once the URL is set."""

from __future__ import annotations

from typing import Any

from taskmesh import create_app
from taskmesh.app.placement import current_placement
from taskmesh.core.claims import gpu_pool
from taskmesh.state.ledger import Ledger

app = create_app("tests.apps.tls_app")


@app.task(profile="gpu", vram="10GiB", time_limit=60)
def reserved() -> dict[str, Any]:
    """What the admission ledger holds for this task's GPU while it runs."""
    uuids = current_placement().gpu_uuids
    pool = gpu_pool(uuids[0])
    return {"gpu_uuids": list(uuids), "reserved_mib": Ledger(app.redis()).used([pool])[pool]}

"""Redis clients for taskmesh's own state, made from an app's broker settings.

taskmesh keeps its ledger, registry and counters in the broker's Redis, so a client
is always derived from the app's ``broker_write_url``/``broker_url``: one place that
knows the accepted URL schemes and what a failover list means.
"""

from __future__ import annotations

from importlib import resources
from typing import Any

import redis
from kombu.utils.url import maybe_sanitize_url

from taskmesh.core.errors import ConfigError

REDIS_SCHEMES = ("redis://", "rediss://", "unix://")


def broker_redis_url(app: Any) -> str:
    """The Redis URL of *app*'s broker, or ``""`` when it is not Redis."""
    conf = app.conf
    url = conf.broker_write_url or conf.broker_url
    if isinstance(url, list | tuple):  # a failover list: the first is the one in use
        url = url[0] if url else None
    url = str(url or "").split(";")[0].strip()
    return url if url.startswith(REDIS_SCHEMES) else ""


def broker_client(app: Any) -> redis.Redis:
    """A new client on *app*'s Redis broker; raises ``ConfigError`` (a ``ValueError``) naming
    the fix otherwise: the command line prints it as one line, a typo such as ``redsi://``
    included, rather than a traceback."""
    url = broker_redis_url(app)
    if not url:
        given = maybe_sanitize_url(str(app.conf.broker_url or "")) or "none"
        raise ConfigError(
            f"app {app.main!r}", "broker_url",
            f"{given!r} is not a Redis URL; taskmesh needs a Redis broker (redis://, rediss://, unix://)",
            "set TASKMESH_BROKER_URL or broker_url, e.g. redis://127.0.0.1:6379/0",
        )
    # Bounded as kombu bounds its own connects: without it a broker host that drops
    # packets holds a producer's submit for the kernel's SYN retries (minutes).
    return redis.Redis.from_url(url, socket_connect_timeout=app.conf.broker_connection_timeout)


def lua(name: str) -> str:
    """The text of ``lua/<name>.lua``, shipped as package data."""
    return resources.files("taskmesh.state").joinpath("lua", f"{name}.lua").read_text()

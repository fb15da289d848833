"""Redis clients for taskmesh's own state, made from an app's broker settings.

taskmesh keeps its ledger, registry and counters in the broker's Redis, so every
client taskmesh opens is made here (``client_from_url``, or ``broker_client`` for an
app): one place that knows the accepted URL schemes, what a failover list means, and
how Celery spells authentication and TLS, so that taskmesh reaches the broker exactly
as Celery's own connections do:

- a password and ACL user in the URL (``redis://user:password@host:port/0``);
- ``rediss://`` URLs, and the TLS files given as query parameters
  (``?ssl_cert_reqs=CERT_REQUIRED&ssl_ca_certs=/etc/ssl/ca.pem``), with Celery's
  documented ``CERT_REQUIRED``/``CERT_OPTIONAL``/``CERT_NONE`` spellings, which redis-py
  itself rejects (it knows only ``required``/``optional``/``none``);
- the ``broker_use_ssl`` setting (a dict of the same keys, values as strings or
  ``ssl.CERT_*``; ``True`` for the defaults), which turns TLS on for a ``redis://`` URL
  too, as kombu does.
"""

from __future__ import annotations

import ssl
from importlib import resources
from typing import Any
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

import redis

from taskmesh.core.errors import ConfigError
from taskmesh.core.redact import redacted

REDIS_SCHEMES = ("redis://", "rediss://", "unix://")
SSL_KEYS = ("ssl_cert_reqs", "ssl_ca_certs", "ssl_certfile", "ssl_keyfile")
CERT_REQS = {
    "cert_required": ssl.CERT_REQUIRED, "required": ssl.CERT_REQUIRED,
    "cert_optional": ssl.CERT_OPTIONAL, "optional": ssl.CERT_OPTIONAL,
    "cert_none": ssl.CERT_NONE, "none": ssl.CERT_NONE,
}


def broker_redis_url(app: Any) -> str:
    """The Redis URL of *app*'s broker, or ``""`` when it is not Redis."""
    conf = app.conf
    url = conf.broker_write_url or conf.broker_url
    if isinstance(url, list | tuple):  # a failover list: the first is the one in use
        url = url[0] if url else None
    url = str(url or "").split(";")[0].strip()
    return url if url.startswith(REDIS_SCHEMES) else ""


def cert_reqs(value: Any) -> ssl.VerifyMode:
    """``ssl_cert_reqs`` in any spelling Celery documents, as ``ssl.VerifyMode``."""
    if isinstance(value, int):
        return ssl.VerifyMode(value)
    found = CERT_REQS.get(str(value).strip().lower())
    if found is None:
        raise ValueError(f"ssl_cert_reqs={value!r} is not one of CERT_REQUIRED, CERT_OPTIONAL, CERT_NONE")
    return found


def tls_settings(url: str, use_ssl: Any = None) -> tuple[str, dict[str, Any]]:
    """*url* without its TLS query parameters, and the TLS keyword arguments for redis-py.

    Query parameters win over *use_ssl*, as in Celery. A ``redis://`` URL with TLS
    query parameters is refused (Celery refuses it too); with *use_ssl* it becomes
    ``rediss://``.
    """
    parts = urlsplit(url)
    pairs = parse_qsl(parts.query, keep_blank_values=True)
    in_query = {k: unquote(v) for k, v in pairs if k in SSL_KEYS}
    if in_query and parts.scheme != "rediss":
        raise ValueError(f"the broker URL {redacted(url)} has TLS parameters ({', '.join(in_query)}) but is not "
                         "rediss://: start it with rediss://")
    options: dict[str, Any] = dict(use_ssl) if isinstance(use_ssl, dict) else {}
    unknown = sorted(set(options) - set(SSL_KEYS))
    if unknown:
        raise ValueError(f"broker_use_ssl has {', '.join(unknown)}; a Redis broker takes {', '.join(SSL_KEYS)}")
    options.update(in_query)
    scheme = parts.scheme
    if scheme == "redis" and use_ssl:
        scheme = "rediss"
    if scheme != "rediss":
        return url, {}
    if "ssl_cert_reqs" in options:
        options["ssl_cert_reqs"] = cert_reqs(options["ssl_cert_reqs"])
    rest = urlencode([(k, v) for k, v in pairs if k not in SSL_KEYS])
    return urlunsplit((scheme, parts.netloc, parts.path, rest, parts.fragment)), options


def client_from_url(url: str, use_ssl: Any = None, **kwargs: Any) -> redis.Redis:
    """A new client on the Redis at *url*, with its password, ACL user and TLS settings."""
    plain, tls = tls_settings(url, use_ssl)
    return redis.Redis.from_url(plain, **tls, **kwargs)


def broker_client(app: Any, **kwargs: Any) -> redis.Redis:
    """A new client on *app*'s Redis broker; raises ``ConfigError`` (a ``ValueError``) naming
    the fix otherwise: the command line prints it as one line, a typo such as ``redsi://``
    included, rather than a traceback."""
    url = broker_redis_url(app)
    if not url:
        given = redacted(str(app.conf.broker_url or "")) or "none"
        raise ConfigError(
            f"app {app.main!r}", "broker_url",
            f"{given!r} is not a Redis URL; taskmesh needs a Redis broker (redis://, rediss://, unix://)",
            "set TASKMESH_BROKER_URL or broker_url, e.g. redis://127.0.0.1:6379/0",
        )
    # Bounded as kombu bounds its own connects: without it a broker host that drops
    # packets holds a producer's submit for the kernel's SYN retries (minutes).
    kwargs.setdefault("socket_connect_timeout", app.conf.broker_connection_timeout)
    return client_from_url(url, app.conf.broker_use_ssl, **kwargs)


def lua(name: str) -> str:
    """The text of ``lua/<name>.lua``, shipped as package data."""
    return resources.files("taskmesh.state").joinpath("lua", f"{name}.lua").read_text()

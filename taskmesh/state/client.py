"""Redis clients for taskmesh's own state, made from an app's settings.

taskmesh keeps its ledger, registry, claims and counters in Redis: the broker's own
Redis by default, or the one ``taskmesh_state_url`` names (``TASKMESH_STATE_URL``, or
``create_app(state=...)``), which a non-Redis broker such as RabbitMQ needs. Every
client taskmesh opens is made here (``client_from_url``, or ``state_client`` for an
app): one place that knows the accepted URL schemes, what a failover list means, and
how Celery spells authentication and TLS, so that taskmesh reaches its Redis exactly
as Celery's own connections do:

- a password and ACL user in the URL (``redis://user:password@host:port/0``);
- ``rediss://`` URLs, and the TLS files given as query parameters
  (``?ssl_cert_reqs=CERT_REQUIRED&ssl_ca_certs=/etc/ssl/ca.pem``), with Celery's
  documented ``CERT_REQUIRED``/``CERT_OPTIONAL``/``CERT_NONE`` spellings, which redis-py
  itself rejects (it knows only ``required``/``optional``/``none``);
- the ``broker_use_ssl`` setting (a dict of the same keys, values as strings or
  ``ssl.CERT_*``; ``True`` for the defaults), which turns TLS on for a ``redis://`` URL
  too, as kombu does. A separate state URL takes ``taskmesh_state_use_ssl`` instead
  (``broker_use_ssl`` then belongs to the broker's own transport).
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
STATE_ENV = "TASKMESH_STATE_URL"
STATE_URL = "taskmesh_state_url"  # the app.conf keys: the state's Redis, and its TLS settings
STATE_USE_SSL = "taskmesh_state_use_ssl"
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


def broker_is_redis(app: Any) -> bool:
    """Whether *app*'s broker is Redis, whose lists, unacked hash and restores taskmesh reads itself."""
    return bool(broker_redis_url(app))


def state_redis_url(app: Any) -> str:
    """The Redis URL of taskmesh's state for *app*: ``taskmesh_state_url``, else the broker's
    when it is Redis, else ``""``."""
    return str(app.conf.get(STATE_URL) or "").strip() or broker_redis_url(app)


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


def state_client(app: Any, **kwargs: Any) -> redis.Redis:
    """A new client on the Redis of *app*'s state; raises ``ConfigError`` (a ``ValueError``)
    naming the fix otherwise: the command line prints it as one line, a typo such as
    ``redsi://`` included, rather than a traceback."""
    explicit = str(app.conf.get(STATE_URL) or "").strip()
    url = state_redis_url(app)
    if explicit and not explicit.startswith(REDIS_SCHEMES):
        raise ConfigError(f"app {app.main!r}", STATE_ENV, f"{redacted(explicit)!r} is not a Redis URL",
                          "set it to redis://, rediss:// or unix://, e.g. redis://127.0.0.1:6379/0")
    if not url:
        given = redacted(str(app.conf.broker_url or "")) or "none"
        raise ConfigError(
            f"app {app.main!r}", "broker_url",
            f"{given!r} is not a Redis URL and {STATE_ENV} is not set; taskmesh needs a Redis broker "
            "(redis://, rediss://, unix://) or that setting for its state (GPU ledger, registry)",
            f"set TASKMESH_BROKER_URL to redis://127.0.0.1:6379/0, or on RabbitMQ set {STATE_ENV} "
            "(or create_app(state=...)) to a Redis URL",
        )
    # Bounded as kombu bounds its own connects: without it a host that drops packets
    # holds a producer's submit for the kernel's SYN retries (minutes).
    kwargs.setdefault("socket_connect_timeout", app.conf.broker_connection_timeout)
    use_ssl = app.conf.get(STATE_USE_SSL) if explicit else app.conf.broker_use_ssl
    return client_from_url(url, use_ssl, **kwargs)


def lua(name: str) -> str:
    """The text of ``lua/<name>.lua``, shipped as package data."""
    return resources.files("taskmesh.state").joinpath("lua", f"{name}.lua").read_text()

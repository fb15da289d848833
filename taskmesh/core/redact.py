"""``redacted(url)``: a broker URL fit to print or log, its password replaced by ``**``.

One helper for every message taskmesh prints or logs that names a broker (``up``'s
banner, errors, ``status``, the worker's warnings), so a password never reaches a
terminal, a log file or a CI transcript. It keeps what a reader needs to find the
broker (scheme, user, host, port, database) and the path of a TLS file, and hides a
password however it is given: in the URL's user part or as a ``password=`` query
parameter. Failover lists (``;``-separated, or a list) are redacted one by one.
"""

from __future__ import annotations

from collections.abc import Iterable
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

MASK = "**"
SECRET_QUERY_KEYS = frozenset({"password", "sentinel_password", "ssl_password"})


def _one(url: str) -> str:
    url = url.strip()
    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:  # not a URL at all: nothing in it can be trusted to be safe
        return MASK if "@" in url else url
    netloc = parts.netloc
    if password is not None:
        user = parts.username or ""
        netloc = f"{user}:{MASK}@{netloc.rsplit('@', 1)[1]}"
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        if any(key.lower() in SECRET_QUERY_KEYS for key, _ in pairs):
            query = urlencode([(k, MASK if k.lower() in SECRET_QUERY_KEYS else v) for k, v in pairs], safe="*/")
    if (netloc, query) == (parts.netloc, parts.query):
        return url  # rebuilt, ``unix:///path`` would lose its empty host
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def redacted(url: str | Iterable[str] | None) -> str:
    """*url* with every password replaced by ``**`` (``""`` for none)."""
    if url is None:
        return ""
    if not isinstance(url, str):
        return ";".join(_one(str(u)) for u in url)
    return ";".join(_one(u) for u in url.split(";"))

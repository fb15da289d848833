"""The secrets of ``taskmesh up``'s stack: a Redis ACL user and password, and Flower's login.

Generated on first start and kept in the stack's data folder, each file readable by
its owner only (mode 600), so a second ``up`` on the same data (the append-only file
keeps the tasks) keeps the credentials a producer was given:

- ``redis-users.conf``: the ACL that redis-server reads as its config file (the same
  lines make an ``--aclfile`` for a deployment: ``taskmesh secrets``). The default
  user is off, so a client that does not log in gets ``NOAUTH`` for every command;
  the ``taskmesh`` user's password is stored as its SHA-256, never in clear.
- ``credentials.env``: ``TASKMESH_BROKER_URL`` (with the password), the password
  alone, and ``FLOWER_BASIC_AUTH``; ``set -a; . .taskmesh/redis/credentials.env; set +a``
  gives a shell, a producer or ``taskmesh status`` the stack's broker.

Secrets reach the processes ``up`` starts by environment and file only, never in
argv, which ``ps`` shows to every user of the machine.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import secrets
import shlex
from pathlib import Path

REDIS_USER = "taskmesh"
FLOWER_USER = "taskmesh"
ACL_FILE = "redis-users.conf"
CREDENTIALS_FILE = "credentials.env"
BROKER_KEY = "TASKMESH_BROKER_URL"
PASSWORD_KEY = "TASKMESH_REDIS_PASSWORD"
FLOWER_KEY = "FLOWER_BASIC_AUTH"  # the variable Flower reads its --basic-auth from


@dataclasses.dataclass(frozen=True)
class StackSecrets:
    """What ``up`` needs to start a locked-down stack and tell its users how to reach it."""

    redis_password: str
    flower_auth: str

    def broker_url(self, port: int) -> str:
        return f"redis://{REDIS_USER}:{self.redis_password}@127.0.0.1:{port}/0"


def write_private(path: Path, text: str) -> None:
    """Write *path* readable by its owner only, also when it already existed with wider rights."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        os.fchmod(out.fileno(), 0o600)
        out.write(text)


def read_credentials(folder: Path) -> dict[str, str]:
    """The variables of *folder*'s ``credentials.env`` (empty when there is none)."""
    path = Path(folder) / CREDENTIALS_FILE
    if not path.is_file():
        return {}
    found = {}
    for line in path.read_text().splitlines():
        if "=" in line and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            found[key.strip()] = (shlex.split(value) or [""])[0]
    return found


def stack_secrets(folder: Path, flower_auth: str | None) -> StackSecrets:
    """The stack's secrets: those kept in *folder*, else new ones; *flower_auth* wins for Flower."""
    kept = read_credentials(folder)
    password = kept.get(PASSWORD_KEY) or secrets.token_urlsafe(24)
    flower = flower_auth or kept.get(FLOWER_KEY) or f"{FLOWER_USER}:{secrets.token_urlsafe(12)}"
    return StackSecrets(password, flower)


def redis_acl(password: str) -> str:
    """redis-server config lines: no anonymous access, one user with every right."""
    digest = hashlib.sha256(password.encode()).hexdigest()
    return f"user default off\nuser {REDIS_USER} on #{digest} ~* &* +@all\n"  # an ACL file takes no comments


def write_secrets(folder: Path, found: StackSecrets, broker_url: str, owns_redis: bool) -> Path:
    """Write the ACL (when ``up`` runs Redis) and ``credentials.env``; returns the latter's path."""
    folder.mkdir(parents=True, exist_ok=True)
    if owns_redis:
        write_private(folder / ACL_FILE, redis_acl(found.redis_password))
    lines = [
        "# taskmesh up's credentials (mode 600). Load them with: set -a; . THIS_FILE; set +a",
        f"{BROKER_KEY}={shlex.quote(broker_url)}",
    ]
    if owns_redis:
        lines.append(f"{PASSWORD_KEY}={shlex.quote(found.redis_password)}")
    lines.append(f"{FLOWER_KEY}={shlex.quote(found.flower_auth)}")
    path = folder / CREDENTIALS_FILE
    write_private(path, "\n".join(lines) + "\n")
    return path


DEPLOYMENT_FILES = ("redis-users.acl", "broker_url", "flower_basic_auth", "grafana_admin_password")


def deployment_secrets(folder: Path, redis_host: str, redis_port: int = 6379) -> list[Path]:
    """The secrets a compose or Kubernetes deployment mounts, one value a file, kept when present.

    The folder is private to its owner (0700); the files in it are 0644, because the
    containers that mount them run as other users (redis-server as ``redis``).
    """
    folder.mkdir(parents=True, exist_ok=True)
    folder.chmod(0o700)
    paths = [folder / name for name in DEPLOYMENT_FILES]
    acl, url, flower, grafana = paths
    if not (acl.exists() and url.exists()):
        password = secrets.token_urlsafe(24)
        acl.write_text(redis_acl(password))
        url.write_text(f"redis://{REDIS_USER}:{password}@{redis_host}:{redis_port}/0")
    if not flower.exists():
        flower.write_text(f"{FLOWER_USER}:{secrets.token_urlsafe(12)}")
    if not grafana.exists():
        grafana.write_text(secrets.token_urlsafe(12))
    for path in paths:
        path.chmod(0o644)
    return paths

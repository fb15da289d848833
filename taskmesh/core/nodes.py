"""Worker node names and groups.

``taskmesh worker`` names its workers ``<group>@<host>``, where the group is a profile's
short name with an index for per-GPU workers (``gpu0@host``, ``cpu@host``, ``io@host``,
``mixed@host``). A worker started by hand under any other name (``celery@host``,
``alice@host``) is grouped by the queues it consumes instead: ``cpu`` for one on
``cpu_intensive``, ``cpu+io`` for one on ``cpu_intensive`` and ``cpu_light``, and
``gpu+cpu+io+mixed`` for a plain ``celery worker`` on all four. The rebalancer, its
scaling hints and pool sizing read the kinds a group is made of (``kinds_of``), so a
hand-named worker counts as what it serves.
"""

from __future__ import annotations

from collections.abc import Iterable

KIND_OF_QUEUE = {"gpu": "gpu", "cpu_intensive": "cpu", "cpu_light": "io", "mixed": "mixed"}
KINDS = tuple(KIND_OF_QUEUE.values())


def node_name(group: str, host: str, index: int | None = None) -> str:
    """``gpu`` + 0 + host → ``gpu0@host``."""
    return f"{group}{'' if index is None else index}@{host}"


def group_of(node: str) -> str:
    """``gpu0@host`` → ``gpu0``: the part before ``@`` (the whole name where there is none)."""
    return node.split("@", 1)[0]


def host_of(node: str) -> str:
    """``gpu0@host`` → ``host``: the part after ``@`` (the whole name where there is none)."""
    return node.split("@", 1)[-1]


def kind_of(group: str) -> str:
    """``gpu0`` → ``gpu``: a group without its per-GPU index."""
    return group.rstrip("0123456789")


def kinds_of(group: str) -> tuple[str, ...]:
    """``gpu0`` → ``("gpu",)``, ``cpu+io`` → ``("cpu", "io")``: the kinds of work a group serves."""
    return tuple(kind_of(part) for part in group.split("+"))


def worker_group(node: str, queues: Iterable[str]) -> str:
    """The group of a worker: from a taskmesh name, else from the queues it consumes
    (need queues such as ``gpu.40960MiB`` count as ``gpu``); the bare name when it
    consumes none of taskmesh's queues."""
    group = group_of(node)
    if kind_of(group) in KINDS:
        return group
    served = {KIND_OF_QUEUE.get(q.split(".", 1)[0]) for q in queues}
    kinds = [kind for kind in KINDS if kind in served]
    return "+".join(kinds) or group

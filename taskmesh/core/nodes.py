"""Worker node names: ``<group>@<host>``, where the group is a profile's short name with
an index for per-GPU workers (``gpu0@host``, ``cpu@host``, ``io@host``, ``mixed@host``).

``taskmesh worker`` names its workers this way, and the rebalancer, the exporter and
``status`` group them by it. A worker started by hand under any other name is its
own group.
"""

from __future__ import annotations


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

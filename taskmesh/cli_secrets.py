"""``taskmesh secrets DIR``: the secrets a compose or Kubernetes deployment mounts."""

from __future__ import annotations

from pathlib import Path

import click

from taskmesh.run.credentials import deployment_secrets


@click.command()
@click.argument("folder", type=click.Path(file_okay=False, path_type=Path))
@click.option("--redis-host", default="redis", show_default=True, help="Host name of Redis as the workers see it.")
@click.option("--redis-port", type=click.IntRange(1, 65535), default=6379, show_default=True)
def secrets(folder: Path, redis_host: str, redis_port: int) -> None:
    """Write a Redis ACL file, the broker URL, Flower's and Grafana's logins into FOLDER
    (one value a file; those already there are kept), for compose/docker-compose.yml or
    kubectl create secret generic --from-file."""
    for path in deployment_secrets(folder, redis_host, redis_port):
        click.echo(str(path))

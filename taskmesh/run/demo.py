"""The built-in demo: GPU, CPU and I/O work on one machine, run by ``taskmesh up --demo``.

The tasks stand for the seed teams' workloads — transcription on a GPU slot, NLP on
a core, API calls on a socket, embeddings on whatever is free — with durations
instead of models, so the demo shows the scheduling without downloading weights.
On a machine without a GPU, ``taskmesh up --demo`` simulates one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import sys
import time
from collections import defaultdict
from typing import Any

from taskmesh.app.celery_app import create_app
from taskmesh.app.placement import current_placement

app = create_app("taskmesh.run.demo")


def _where(started: float) -> dict[str, Any]:
    return {**dataclasses.asdict(current_placement()), "started": started, "finished": time.time()}


@app.task(profile="gpu", vram="4GiB", model="whisper-small", time_limit=600)
def transcribe(seconds: float) -> dict[str, Any]:
    """Holds a GPU slot for *seconds* (a stand-in for a model forward pass)."""
    started = time.time()
    time.sleep(seconds)
    return _where(started)


@app.task(profile="cpu_intensive", cpu_threads=1, time_limit=600)
def lemmatize(seconds: float) -> dict[str, Any]:
    """Burns one core for *seconds* of real hashing work."""
    started = time.time()
    digest = b"taskmesh"
    while time.time() - started < seconds:
        for _ in range(2000):
            digest = hashlib.sha256(digest).digest()
    return _where(started)


@app.task(profile="io", time_limit=600)
def fetch_concepts(seconds: float) -> dict[str, Any]:
    """Waits *seconds* on I/O (gevent makes a hundred of these cheap)."""
    started = time.time()
    time.sleep(seconds)
    return _where(started)


@app.task(profile="mixed", fallback="cpu_intensive", time_limit=600)
def embed(seconds: float) -> dict[str, Any]:
    """Runs on a GPU when one is admissible, else on CPU."""
    started = time.time()
    time.sleep(seconds)
    return _where(started)


DEFAULT_WORKLOAD = {transcribe: (4, 1.0), lemmatize: (6, 0.5), fetch_concepts: (40, 0.5), embed: (2, 0.5)}


def run_workload(workload: dict[Any, tuple[int, float]] | None = None, timeout: float = 300) -> dict[str, Any]:
    """Submit the workload, wait for every result, and summarise per queue."""
    workload = workload or DEFAULT_WORKLOAD
    submitted = time.time()
    pending = [
        (task.requirement.profile.queue, task.delay(seconds))
        for task, (count, seconds) in workload.items()
        for _ in range(count)
    ]
    per_queue: dict[str, list[dict[str, Any]]] = defaultdict(list)
    failed = 0
    for queue, result in pending:
        try:
            per_queue[queue].append(result.get(timeout=timeout))
        except Exception as exc:  # a failed task is counted and named, not a crashed demo
            failed += 1
            print(f"taskmesh: demo task {result.id} on {queue} failed: {type(exc).__name__}: {exc}", file=sys.stderr)
    summary = {}
    for queue, results in per_queue.items():
        wall = max(r["finished"] for r in results) - submitted
        summary[queue] = {
            "tasks": len(results),
            "wall_s": round(wall, 2),
            "throughput_per_s": round(len(results) / wall, 2),
            "nodes": sorted({r["node"] for r in results}),
            "pools": sorted({r["pool"] for r in results}),
        }
    summary["total"] = {
        "tasks": len(pending),
        "succeeded": len(pending) - failed,
        "failed": failed,
        "wall_s": round(time.time() - submitted, 2),
    }
    return summary


def format_summary(summary: dict[str, Any]) -> str:
    lines = [f"{'queue':<14}{'tasks':>6}{'wall s':>9}{'tasks/s':>9}  pools / nodes"]
    for queue, row in summary.items():
        if queue == "total":
            continue
        lines.append(
            f"{queue:<14}{row['tasks']:>6}{row['wall_s']:>9.2f}{row['throughput_per_s']:>9.2f}  "
            f"{','.join(row['pools'])} / {','.join(row['nodes'])}"
        )
    total = summary["total"]
    lines.append(f"{'total':<14}{total['tasks']:>6}{total['wall_s']:>9.2f}  "
                 f"{total['succeeded']} succeeded, {total['failed']} failed")
    return "\n".join(lines)

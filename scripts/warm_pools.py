"""Measure where warm models live: one GPU worker with two slots, prefork against threads.

    python scripts/warm_pools.py [tasks]

Starts its own redis-server and a ``taskmesh worker --profile gpu`` on one simulated
48 GiB GPU (``tests/apps/model_app.py``: a 16 GiB model whose loader sleeps 1 s), sends
*tasks* (default 40) tasks of 0.2 s for that model, and prints, per pool: model loads,
the most GPU memory the ledger held (during the first load every slot's task carries the
model's memory, as none is warm yet), what it holds once the tasks ended, and the
makespan. Everything it starts is stopped by pid.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import redis

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from taskmesh.core.claims import gpu_pool  # noqa: E402
from taskmesh.hardware.simulated import SimulatedProvider  # noqa: E402
from taskmesh.run.stack import free_port  # noqa: E402
from taskmesh.run.supervisor import stop_process  # noqa: E402
from taskmesh.state.ledger import Ledger  # noqa: E402

GPU = "1x48GiB"


def measure(url: str, pool: str, tasks: int) -> dict[str, float]:
    client = redis.Redis.from_url(url)
    client.flushall()
    env = {**os.environ, "TASKMESH_BROKER_URL": url, "TASKMESH_SIMULATE_GPUS": GPU, "TASKMESH_GPU_SLOTS": "2",
           "TASKMESH_GPU_POOL": pool}
    worker = subprocess.Popen([sys.executable, "-m", "taskmesh", "-A", "tests.apps.model_app", "worker",
                               "--profile", "gpu", "--loglevel", "ERROR"], env=env, cwd=ROOT,
                              start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    from tests.apps import model_app

    model_app.app.conf.broker_url = model_app.app.conf.result_backend = url
    try:
        while not model_app.app.control.ping(timeout=0.5):
            time.sleep(0.2)
        ledger_pool = gpu_pool(SimulatedProvider(GPU).snapshot()[0].uuid)
        peak, done = [0], threading.Event()

        def sample() -> None:
            while not done.is_set():
                peak[0] = max(peak[0], Ledger(client).used([ledger_pool])[ledger_pool])
                time.sleep(0.02)

        sampler = threading.Thread(target=sample)
        sampler.start()
        started = time.monotonic()
        for result in [model_app.use_cheap.delay(0.2) for _ in range(tasks)]:
            result.get(timeout=120)
        makespan = time.monotonic() - started
        done.set()
        sampler.join()
        loads = sum(1 for e in client.lrange(model_app.EVENTS, 0, -1) if e.startswith(b"load:"))
        time.sleep(1.0)  # the last task's release
        after = Ledger(client).used([ledger_pool])[ledger_pool] / 1024
        return {"loads": loads, "peak_reserved_gib": peak[0] / 1024, "reserved_after_gib": after,
                "makespan_s": round(makespan, 2)}
    finally:
        stop_process(worker, grace_s=20)


def main() -> None:
    tasks = int(sys.argv[1]) if len(sys.argv) > 1 else 40
    port = free_port()
    server = subprocess.Popen([shutil.which("redis-server") or "redis-server", "--port", str(port), "--bind",
                               "127.0.0.1", "--save", "", "--appendonly", "no"], stdout=subprocess.DEVNULL)
    try:
        time.sleep(0.3)
        for pool in ("prefork", "threads"):
            print(pool, measure(f"redis://127.0.0.1:{port}/0", pool, tasks), flush=True)
    finally:
        server.terminate()
        server.wait(10)


if __name__ == "__main__":
    main()

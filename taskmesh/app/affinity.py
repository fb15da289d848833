"""Producer side of warm-model affinity: a task for model M goes to M's model queue
(``core.model_queues``) when a live worker says it has M warm, else to its profile queue.

What the workers say is read per model at most every ``CACHE_S``, like the registry view
the submit checks use: a model evicted meanwhile costs nothing but a queue that a worker
which can fit M takes over (the stranded rule), so the answer need not be fresher.
A model label nobody holds (or one no worker declares) never leaves the profile queue.
Only on a Redis broker: the workers' burst and stranded-queue rules read the model
queues' depth from Redis's lists, so on any other broker a model queue whose holder went
away could strand its messages, and every task stays on its profile queue.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import redis

from taskmesh.core.model_queues import model_queue
from taskmesh.core.profiles import Profile
from taskmesh.state.models import ModelStore

CACHE_S = 2.0
REDIS_SCHEMES = ("redis", "rediss", "redis+socket")


class Affinity:
    def __init__(self, client: redis.Redis, broker_url: str) -> None:
        self.store = ModelStore(client)
        self.enabled = str(broker_url).split(":", 1)[0] in REDIS_SCHEMES
        self._ready: dict[str, tuple[float, bool]] = {}  # model → (when read, warm on a live worker)

    def queue_for(self, model: str | None, queue: str, live_nodes: Callable[[], set[str]]) -> str:
        """*queue* (the profile's), or *model*'s model queue when a live worker has it warm."""
        if not model or not self.enabled or queue != Profile.GPU_INTENSIVE.queue:
            return queue
        at, ready = self._ready.get(model, (0.0, False))
        if time.monotonic() - at > CACHE_S:
            holders = self.store.ready(model)
            ready = bool(holders) and bool(set(holders) & live_nodes())
            self._ready[model] = (time.monotonic(), ready)
        return model_queue(model) if ready else queue

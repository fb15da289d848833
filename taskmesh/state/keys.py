"""Every Redis key taskmesh uses, and kombu's own key layout, named in one place.

taskmesh shares the broker's Redis with Celery: its keys all start ``taskmesh:``.
kombu's Redis transport keeps one list per priority step (``queue``, then
``queue<sep><step>``), the messages delivered and not yet acknowledged in an
``unacked`` hash, and prefixes every key with ``global_keyprefix``; ``layout`` reads
those from an app's transport options, so nothing else hard-codes them. A leaf
module: any layer may import it.
"""

from __future__ import annotations

from typing import Any

# --- taskmesh's own keys ---------------------------------------------------------------
LEDGER_PREFIX = "taskmesh:ledger:"  # + pool: hash id → amount; + pool + ":expiry": zset id → expiry
WORKERS = "taskmesh:workers"  # worker key → WorkerRecord JSON
STATES = "taskmesh:worker-state"  # node → the admission controller's state (what stats shows)
COUNTERS = "taskmesh:counters"  # fleet-wide totals: admitted, pauses, queue_full, infeasible, ...
RUNTIMES = "taskmesh:runtimes"  # "q:<queue>:sum" / "q:<queue>:count", "t:<task>:...": observed run times
INFLIGHT = "taskmesh:inflight:"  # + worker key: the delivery tags it holds
LEASES = "taskmesh:leases"  # zset worker key → when it last renewed its lease (Redis server time)
GIVEN_BACK = "taskmesh:given-back:"  # + worker key: tag → task id delivered again when it was presumed dead
NEED_QUEUES = "taskmesh:need-queues"  # queue name → the requirement its GPUs must meet
JANITOR = "taskmesh:janitor"  # lock: one process at a time gives back dead workers' messages
ORPHANS = "taskmesh:orphans"  # delivery tag → when (Redis time) it was first seen unacknowledged and held by no worker
ORPHAN_SWEEP = "taskmesh:orphan-sweep"  # lock with expiry: one orphan sweep per period in the fleet
FETCH_IDLE = "taskmesh:fetch-idle"  # a list nothing pushes to: an idle worker's fetch waits on it (worker/fetch.py)
FETCH_WAKE = "taskmesh:fetch-wake:"  # + queue: one token, pushed by a taskmesh producer after each send to it
PROGRESS = "taskmesh:progress"  # task id → {done, total, started, updated, task, worker}
REBALANCE_LOCK = "taskmesh:rebalance:lock"
REBALANCE_RUNS = "taskmesh:rebalance:runs"  # the latest runs, newest first
REBALANCE_RESIZED = "taskmesh:rebalance:resized"  # node → when its pool was last resized
ALERTS = "taskmesh:alerts"  # alert key → JSON
DEAD_LETTERS = "taskmesh:dead-letters"  # task id → JSON: tasks that failed for good, and messages refused unrun
ONCE_PREFIX = "taskmesh:once:"  # + task id + ":" + retries: "running:<holder>", "returned" or "done" (once=True)
# warm models
MODELS_HELD = "taskmesh:models:"  # + node: hash pool pid → JSON of the models that process holds and its state
MODEL_LOAD_S = "taskmesh:model-load-s"  # model → learned load time (EWMA, seconds), shared by the fleet
MODEL_LOADS = "taskmesh:model-loads"  # "<model>:count" / "<model>:seconds": loads done and time spent
EVICTIONS = "taskmesh:evictions"  # list, newest first: each eviction decision and its reason (JSON)
MODEL_READY = "taskmesh:model-ready:"  # + model: hash node → slots of a worker with it warm (consuming its queue)
WARM_UPS = "taskmesh:warm-ups"  # list, newest first: each burst warm-up decision and its numbers (JSON)

EXCLUSIVE = "taskmesh:exclusive"  # the batch id of the exclusive batch running now (a lease: it expires)
EXCLUSIVE_INFO = "taskmesh:exclusive:info"  # batch id → JSON: its task, total, when it began, reload_after
EXCLUSIVE_WARM = "taskmesh:exclusive:warm:"  # + batch id: hash node → JSON list of the models warm there at entry

# --- micro-batching, batch jobs and result caching ---
BATCH_JOB_PREFIX = "taskmesh:batch:"  # + batch id: hash task, total, created, cancelled; + ":ids": its task ids
BATCH_JOBS = "taskmesh:batch-jobs"  # zset: batch id → when it was submitted (the newest are shown by top)
BATCH_STATS = "taskmesh:batch-stats"  # "<task>|calls", "|items", "|seconds", "|size_le_<n>": batches run, per task
CACHE_PREFIX = "taskmesh:cache:"  # + task + ":" + digest of the arguments: the JSON result, with the task's TTL


def simulation_key(host: str) -> str:
    """The hash that drives a host's simulated GPUs (``SimulationControl``)."""
    return f"taskmesh:simulated:{host}"


# --- kombu's Redis transport -----------------------------------------------------------
PRIORITY_STEPS = (0, 3, 6, 9)  # kombu.transport.redis.PRIORITY_STEPS
SEP = "\x06\x16"  # kombu.transport.redis.Channel.sep
UNACKED = "unacked"  # kombu.transport.redis.Channel.unacked_key


def priority_key(queue: str, step: int, sep: str = SEP, keyprefix: str = "") -> str:
    """``Channel._q_for_pri``: step 0 is the bare queue name, others are suffixed."""
    return f"{keyprefix}{queue}{sep}{step}" if step else f"{keyprefix}{queue}"


def layout(app: Any) -> dict[str, Any]:
    """kombu's Redis key layout for *app*'s transport options: ``queue_depths``'s keywords."""
    options = app.conf.broker_transport_options or {}
    return {
        "priority_steps": options.get("priority_steps", PRIORITY_STEPS),
        "sep": options.get("sep", SEP),
        "keyprefix": options.get("global_keyprefix", ""),
        "unacked_key": options.get("unacked_key", UNACKED),
    }

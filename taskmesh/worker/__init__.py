"""The worker side of admission, and the only place that touches Celery's and kombu's
worker internals.

A consumer bootstep (``bootstep``) builds one ``AdmissionController`` per worker
process; a custom task ``Strategy`` and ``Request`` (``strategy``) route every message
through it before Celery runs it (scheduled ones when they come due) and tell it when a
run ends. ``refusal`` and ``envelope`` keep unreadable messages from reaching Celery;
``once`` skips second deliveries of ``once=True`` runs; ``intake`` pauses and resumes
the task consumer; ``gpu_queues`` decides which GPU queues it takes from; ``heartbeat``
renews the worker's ``lease``, announces it, refreshes its reservations and triggers
``recovery`` of dead workers' messages; ``control`` holds the remote-control commands;
``report`` what ``inspect stats`` and events show; ``warm`` admits tasks for warm
models and decides evictions; ``batching`` is the strategy of ``batch_size`` tasks (a
buffer of requests, flushed into one admitted pool job) and ``batch_run`` runs such a
job and ends each item's request. May import ``core``, ``hardware`` and
``state``.
"""

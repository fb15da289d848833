"""The worker side of admission, and the only place that touches Celery's and kombu's
worker internals.

A consumer bootstep (``bootstep``) builds one ``AdmissionController`` per worker
process; a custom task ``Strategy`` and ``Request`` (``strategy``) route every message
through it before Celery runs it and tell it when a run ends; ``intake`` pauses and
resumes the task consumer; ``heartbeat`` announces the worker, refreshes its
reservations and triggers ``recovery`` of dead workers' messages; ``control`` holds
the remote-control commands; ``report`` what ``inspect stats`` and events show. May
import ``core``, ``hardware`` and ``state``.
"""

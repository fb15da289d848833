"""The message headers taskmesh adds to Celery's, named in one place.

Producers stamp them in ``TaskmeshTask.apply_async``; workers, the rebalancer and the
exporter read them straight from kombu's stored messages, so every reader must agree
on the spelling.
"""

REQUIREMENT_HEADER = "taskmesh"  # the task's Requirement, as Requirement.to_header() writes it
ENQUEUED_AT = "taskmesh_enqueued_at"  # time.time() at submit: the age of what waits
GPUS_HEADER = "taskmesh_gpus"  # set by the worker on admission: the UUIDs of the GPUs given to the run
FALLBACK_HEADER = "taskmesh_fallback_from"  # the queue a fallback move took the message from

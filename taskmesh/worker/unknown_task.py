"""One line, not a page, for a message naming a task this worker does not have.

Celery logs such a message as a 16-line block with a ``KeyError`` traceback and the
whole body and headers (``Consumer.on_unknown_task``); it then discards the message and
fails the caller's result with ``NotRegistered``, which stays as it is. A typo in a task
name, or a worker started without the module that defines the task, is a user's mistake:
it gets one line naming the task and the fix.
"""

from __future__ import annotations

import logging

from celery.worker.consumer import consumer

FIX = ("import the module that defines it in this worker's app (-A, include= or imports=), or correct the "
       "task name the producer sends")


class OneLineUnknownTask(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if record.msg is consumer.UNKNOWN_TASK_ERROR:
            name = (record.args or ("?",))[0]
            task_id = ((record.args or ())[2:3] or [{}])[0]
            task_id = task_id.get("id") if isinstance(task_id, dict) else None
            record.msg = "received task %s (id %s), which this worker does not have: discarded, the caller " \
                         "gets NotRegistered; %s"
            record.args = (name, task_id, FIX)
            record.exc_info = record.exc_text = None
        return True


def one_line_unknown_tasks() -> None:
    """Install the filter on Celery's consumer logger (once per process)."""
    if not any(isinstance(f, OneLineUnknownTask) for f in consumer.logger.filters):
        consumer.logger.addFilter(OneLineUnknownTask())

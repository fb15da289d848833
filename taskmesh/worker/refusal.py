"""Refusing a message that cannot run safely, instead of crashing on it.

A ``taskmesh`` header that cannot be read, a missing task id or a body that cannot be
decoded used to escape the strategy and end the worker ("Unrecoverable error"); kombu
then restored the message and every restart died on it again. Such a message is now
acknowledged with one line naming the task id, the task, the field and the fix, kept
in the dead-letter list (``state.dead_letters``) and marked failed in the result
backend, as Celery marks a message for an unknown task, so ``.get()`` says why rather
than waiting for ever. Celery's own ``task_rejected`` signal is sent.
"""

from __future__ import annotations

import datetime
import logging
from typing import Any

from celery import signals
from celery.utils.time import maybe_iso8601
from kombu.exceptions import ContentDisallowed

from taskmesh.core.errors import MessageRefused, TaskmeshError
from taskmesh.core.header_fields import shown
from taskmesh.core.headers import FALLBACK_HEADER, REQUIREMENT_HEADER
from taskmesh.core.requirements import Requirement
from taskmesh.state.dead_letters import add_dead_letter

log = logging.getLogger(__name__)
RESEND = ("send it with the task's own .delay()/.apply_async(), which writes headers['taskmesh'] "
          "(Requirement.to_header)")


def fix_for(consumer: Any, problem: Exception) -> str:
    """What the sender should change: a content type this worker does not accept (unsigned
    JSON where workers take only signed ``auth`` messages) is fixed at the sender's settings."""
    if isinstance(problem, ContentDisallowed):
        accepted = ", ".join(sorted(consumer.app.conf.accept_content or ()))
        return (f"this worker accepts only {accepted} messages: send it from an app with the same task_serializer "
                "and accept_content (for 'auth', signed with a key whose certificate is in security_cert_store)")
    return RESEND

def _is_seconds(value: Any) -> bool:
    return value is None or (isinstance(value, int | float) and not isinstance(value, bool) and value >= 0)


def celery_header_problem(headers: Any) -> MessageRefused | None:
    """A Celery header that Celery itself would crash on or drop with a traceback: ``timelimit``
    that is not ``[soft, hard]`` seconds ends the worker in the pool's timer ("Unrecoverable
    error"), a ``retries`` that is not a count breaks run-once and retry, an ``eta`` or ``expires``
    that is not a date is discarded with no trace of it. Checked before anything else."""
    if not isinstance(headers, dict):
        return None  # refused with the body and task id checks
    limits = headers.get("timelimit")
    if limits is not None and not (isinstance(limits, list | tuple) and len(limits) == 2
                                   and all(_is_seconds(v) for v in limits)):
        return MessageRefused(f"its header 'timelimit' is {shown(limits)}, not Celery's [soft, hard] in seconds")
    retries = headers.get("retries")
    if retries is not None and not (isinstance(retries, int) and not isinstance(retries, bool) and retries >= 0):
        return MessageRefused(f"its header 'retries' is {shown(retries)}, not a count >= 0")
    for name in ("eta", "expires"):
        value = headers.get(name)
        if value is None or isinstance(value, datetime.datetime):
            continue
        try:
            maybe_iso8601(value)
        except (TypeError, ValueError):
            return MessageRefused(f"its header {name!r} is {shown(value)}, not an ISO 8601 date and time")
    return None


def requirement_of(message: Any) -> Requirement:
    """What the message runs under; raises on anything that cannot run safely.

    The body is decoded here because Celery's strategy decodes it next anyway (kombu
    caches it): a body that cannot be read, or is not what the strategy indexes into
    (protocol 2's ``[args, kwargs, embed]``, or a dict with ``args``), is refused
    before anything is reserved.
    """
    headers = message.headers
    body = message.decode()
    if not (isinstance(body, dict) and "args" in body) and not (
        isinstance(body, (list, tuple)) and len(body) == 3 and isinstance(body[0], (list, tuple))
        and isinstance(body[1], dict) and isinstance(body[2], dict)
    ):
        raise MessageRefused(f"its body is {shown(body)}, not Celery's [args, kwargs, embed]")
    task_id = headers.get("id") if "task" in headers else body.get("id") if isinstance(body, dict) else None
    if not isinstance(task_id, str) or not task_id:  # protocol 1 carries it in the body
        raise MessageRefused("the message has no task id (headers['id'])")
    requirement = Requirement.from_header(headers.get(REQUIREMENT_HEADER) or {}, str(headers.get("task")))
    return requirement.as_fallback() if headers.get(FALLBACK_HEADER) else requirement


def _text(body: Any) -> str:
    return body.decode("utf-8", "replace") if isinstance(body, bytes) else str(body)


def refuse(consumer: Any, client: Any, message: Any, problem: Exception) -> None:
    """Acknowledge a message that cannot run safely: one line, a dead letter, a failed result."""
    headers = message.headers if isinstance(message.headers, dict) else {}
    task_id, name = headers.get("id"), headers.get("task")
    queue = (message.delivery_info or {}).get("routing_key")
    why = str(problem) if isinstance(problem, TaskmeshError) else (
        f"its body cannot be read ({type(problem).__name__}: {problem})")
    line = f"refused task {task_id} ({name}) from queue {queue}, not run: {why}"
    fix = fix_for(consumer, problem)
    log.error("%s. Kept in the dead letters (taskmesh dlq list). Fix: %s, or correct what the message holds",
              line, fix)
    add_dead_letter(client, why, task_id=task_id, task=name, queue=queue, worker=consumer.hostname,
                    headers=headers, body=_text(message.body), content_type=message.content_type,
                    content_encoding=message.content_encoding)
    if isinstance(task_id, str):
        try:
            consumer.app.backend.mark_as_failure(task_id, MessageRefused(f"{line}; {fix}"))
        except Exception as exc:  # no result backend, or it is down: the log line and the dead letter stay
            log.debug("could not store the refusal of %s as its result: %s", task_id, exc)
    message.ack()
    signals.task_rejected.send(sender=consumer, message=message, exc=problem)

"""A broker that is down, as a Celery user expects to see it at ``.delay()``.

kombu's ``OperationalError`` is what Celery raises when a publish fails after its
retries, and what users catch; taskmesh raises a subclass of it, with one line naming
the broker (password redacted) and the fix, whichever step found the broker gone:
taskmesh's own submit checks, Celery's result subscription or the publish itself.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import redis
from kombu.exceptions import OperationalError

from taskmesh.core.redact import redacted
from taskmesh.state.client import STATE_ENV, broker_is_redis, broker_redis_url, state_redis_url

REDIS_DOWN = (redis.ConnectionError, redis.TimeoutError)


class BrokerUnreachable(OperationalError):
    """The broker did not answer after the publish retries; nothing was sent."""


def broker_unreachable(app: Any, exc: BaseException) -> BrokerUnreachable:
    reason = " ".join(str(exc).split()).rstrip(".") or type(exc).__name__
    if isinstance(exc, REDIS_DOWN) and not broker_is_redis(app):  # RabbitMQ's app: its state Redis is down
        return BrokerUnreachable(f"cannot reach taskmesh's Redis at {redacted(state_redis_url(app))} ({reason}); "
                                 f"nothing was sent: start it or point {STATE_ENV} at a running Redis")
    url = redacted(broker_redis_url(app) or str(app.conf.broker_url))
    return BrokerUnreachable(
        f"cannot reach the broker at {url} ({reason}); nothing was sent: start it (taskmesh up) "
        "or point TASKMESH_BROKER_URL (or broker_url) at a running Redis"
    )


@contextlib.contextmanager
def broker_errors(app: Any) -> Iterator[None]:
    """Around a whole submit: a broker that is down surfaces as one ``OperationalError``.

    Celery's Redis result backend subscribes to the result before publishing and, when
    that fails after its own retries, raises a ``RuntimeError`` that says the app must
    be restarted (it need not be); the publish raises kombu's error with no broker
    named. Both become the same one-line ``BrokerUnreachable``. The subscription waits
    as long as the result backend's ``retry_policy`` says (Celery's default, about 20 s)
    before failing: taskmesh keeps that default because the same policy is what lets a
    producer's ``.get()`` and a worker's result write ride through a Redis restart.
    """
    try:
        yield
    except BrokerUnreachable:
        raise
    except REDIS_DOWN as exc:
        raise broker_unreachable(app, exc) from exc
    except (OperationalError, RuntimeError) as exc:
        if not isinstance(exc.__cause__, REDIS_DOWN + (OSError,)):
            raise
        raise broker_unreachable(app, exc.__cause__) from exc

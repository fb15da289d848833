"""Which GPU queues a worker takes from, and where a GPU task goes that it can never run.

A worker whose GPUs can never fit a task publishes it to the need queue of GPUs that
can (``core.need_queues``), or to ``gpu`` when it sees no GPU at all (or, for a task whose
model is warm on another worker, to the model's queue: ``model_queues.hand_over``), and
acknowledges its own copy; it consumes every registered need queue its GPUs could serve; and a
worker that sees no GPU consumes no GPU queue (fail closed), saying why. Each function
takes the worker's ``AdmissionController``.
"""

from __future__ import annotations

import logging
from typing import Any

from taskmesh.core.gate import Reroute
from taskmesh.core.model_queues import model_of
from taskmesh.core.need_queues import can_serve, family
from taskmesh.core.profiles import Profile
from taskmesh.core.requirements import Requirement
from taskmesh.worker.rabbitmq import wire_priority

log = logging.getLogger(__name__)


def reroute(controller: Any, message: Any, decision: Reroute, requirement: Requirement) -> None:
    """Publish the message to the queue of GPUs that can run it, then ack it here."""
    queue = decision.queue
    if queue != Profile.GPU_INTENSIVE.queue and model_of(queue) is None:
        controller.registry.register_need_queue(queue, requirement)
    app = controller.consumer.app
    with app.producer_or_acquire() as producer:
        producer.publish(
            message.body,
            exchange=queue,
            routing_key=queue,
            declare=[app.amqp.queues[queue]],
            content_type=message.content_type,
            content_encoding=message.content_encoding,
            headers=message.headers,
            priority=wire_priority(message, message.properties.get("priority")),
            **{k: v for k, v in message.properties.items() if k in ("correlation_id", "reply_to")},
        )
    message.ack()
    with controller.lock:
        controller.tags.pop(message.headers.get("id"), None)
    controller.gave_up(message.headers.get("id"))
    controller.counters["rerouted"] += 1
    level = logging.WARNING if queue == Profile.GPU_INTENSIVE.queue else logging.INFO
    log.log(level, "task %s (%s): %s; sent to queue %s", message.headers.get("id"), message.headers.get("task"),
            decision.reason, queue)


def refuse_gpu_queues(controller: Any) -> None:
    """Fail closed: a worker that sees no GPU consumes no GPU queue, and says why (at start,
    and again whenever a GPU queue is added to it, e.g. after a reconnect or ``add_consumer``)."""
    dropped = [q for q in controller.intake.consumed() if family(q) == Profile.GPU_INTENSIVE.queue]
    for queue in dropped:
        controller.intake.drop(queue)
    if dropped:
        controller.reasons["no_gpu"] = f"{controller.no_gpu}; not consuming {', '.join(dropped)}"
        log.error("%s was started on %s but sees no GPU: %s. It takes no GPU work until restarted with a GPU; "
                  "its GPU tasks wait in their queue for a worker that has one", controller.node, ", ".join(dropped),
                  controller.no_gpu)

def subscribe_need_queues(controller: Any) -> None:
    if controller.counters["ticks"] % 4 == 0:
        margin = controller.gate.config.safety_margin_mib
        for name, need in controller.registry.need_queues().items():
            if name not in controller.subscribed and can_serve(controller.gate.known.values(), need, margin):
                controller.subscribed.add(name)
                controller.intake.add(name)
                log.info("consuming %s: this worker's GPUs can run what it holds", name)
    controller.counters["ticks"] += 1

"""A held message handed back (``requeue_at_front``) must leave the copy it put back protected.

kombu keys ``unacked`` by the delivery tag, and a message put back keeps its tag. A worker
that hands a held message back while a BRPOP waits on the queue (its own, since intake is
open while it backfills, or another worker's) sees it taken again at once; if the hand-back
then sent an ack, that ack deleted the *new* holder's ``unacked`` entry, and a crash of the
new holder lost the message. Here the interleaving is forced with real kombu connections to
a real redis-server: a second consumer takes the message the instant it is put back.
"""

from __future__ import annotations

import pytest
from kombu import Connection, Queue

from taskmesh.state.keys import UNACKED
from taskmesh.worker.recovery import put_back_line
from taskmesh.worker.strategy import requeue_at_front

QUEUE = "give-back-test"


@pytest.mark.parametrize("how", ["restore", "line put back first"])
def test_a_message_handed_back_and_taken_again_at_once_stays_unacknowledged_for_its_new_holder(
        broker_url, broker, how):
    with Connection(broker_url) as holder, Connection(broker_url) as other:
        holder.Producer().publish({"n": 1}, routing_key=QUEUE, declare=[Queue(QUEUE)], serializer="json")
        held = holder.default_channel.basic_get(QUEUE)
        assert held is not None and broker.hexists(UNACKED, held.delivery_tag)
        taken = []
        qos = held.channel.qos
        restore = qos.restore_by_tag

        def restore_and_taken_at_once(tag, *args, **kwargs):  # the waiting BRPOP wins the race
            restore(tag, *args, **kwargs)
            taken.append(other.default_channel.basic_get(QUEUE))

        if how == "restore":
            qos.restore_by_tag = restore_and_taken_at_once
            requeue_at_front(held)
        else:
            put_back_line([held])
            taken.append(other.default_channel.basic_get(QUEUE))
            requeue_at_front(held, restore=False)
        assert taken and taken[0] is not None and taken[0].delivery_tag == held.delivery_tag
        assert held.acknowledged  # the hand-back is done, as far as the first holder's channel knows
        # the new holder's copy is still recorded as unacknowledged: a crash now would not lose it
        assert broker.hexists(UNACKED, held.delivery_tag)

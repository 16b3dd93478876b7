"""Money that needs a person now: refunds owed, and authorizations about to lapse.

Read from the database at scrape time (consumer/worker.py, `exposition`) into
the gauges `intentflow_consumer_refunds_owed` and `..._captures_due_soon`
(consumer/metrics.py); `CAPTURED_NOT_RETURNED` is also `reconcile`'s check
`captured_money_of_unfillable_order_returned`. Each query reads a partial index
(`orders_unfillable_idx`, `orders_capture_before_idx`), not the orders table.
"""

from __future__ import annotations

from typing import NamedTuple

from intentflow.consumer.allocation import UNFILLABLE
from intentflow.consumer.connections import Connection
from intentflow.consumer.facts import DISPUTE_CLOSED, DISPUTE_WITHDRAWN


def sql_list(values: frozenset[str]) -> str:
    """Constant strings of ours (never input) as an SQL list, in a stable order."""
    return ", ".join(f"'{v}'" for v in sorted(values))


# Orders that cannot be filled whose captured money is neither refunded, nor taken
# back by a dispute, nor on its way back: no refund asked, or its row refused or owed
# (REFUND_UNFILLABLE=false, or a refund that failed), or done for over ON_ITS_WAY and
# still no event of Stripe's says the money went back (the refund events not enabled
# at the endpoint, or a failure the outbox could not place). An open dispute that
# Stripe says keeps the payment from being refunded is waited out: the order shows
# `disputed`, and the refund of what is left is asked once it closes
# (consumer/facts.py, `owed_back`, `refund_blocked`).
ON_ITS_WAY = "1 hour"
CAPTURED_NOT_RETURNED = f"""
    SELECT o.id AS order_id, o.payment_intent_id, o.allocation, o.amount_captured,
           o.amount_refunded, o.dispute_amount,
           coalesce(x.outcome, x.state, 'never asked') AS refund
    FROM orders o JOIN payment_intents p ON p.id = o.payment_intent_id
    LEFT JOIN outbox x ON x.kind = 'stripe_action' AND x.name = 'refund_payment_intent'
                      AND x.payment_intent_id = o.payment_intent_id
    WHERE o.allocation IN ({sql_list(UNFILLABLE)}) AND p.status = 'succeeded'
      AND o.amount_captured > o.amount_refunded + CASE
            WHEN o.dispute_status IN ({sql_list(DISPUTE_WITHDRAWN)})
            THEN coalesce(o.dispute_amount, 0) ELSE 0 END
      AND NOT (o.dispute_status IS NOT NULL
               AND o.dispute_status NOT IN ({sql_list(DISPUTE_CLOSED)})
               AND NOT coalesce(o.dispute_refundable, false))
      AND (x.id IS NULL OR x.state = 'failed'
           OR (x.state = 'done' AND x.done_at < now() - interval '{ON_ITS_WAY}'))
    ORDER BY o.id
"""

# Placed orders whose authorization Stripe lets lapse within $1 seconds and that are
# still uncaptured (a lapsed one is canceled by Stripe: the order with it).
CAPTURES_DUE_SOON = """
    SELECT count(*) FROM orders o JOIN payment_intents p ON p.id = o.payment_intent_id
    WHERE o.status = 'placed' AND o.capture_before IS NOT NULL
      AND o.capture_before < now() + make_interval(secs => $1)
      AND p.status = 'requires_capture'
"""


class Owed(NamedTuple):
    refunds: int
    captures_due_soon: int


async def read(conn: Connection, capture_warning_s: float) -> Owed:
    refunds = await conn.fetchval(f"SELECT count(*) FROM ({CAPTURED_NOT_RETURNED}) owed")
    due = await conn.fetchval(CAPTURES_DUE_SOON, capture_warning_s)
    return Owed(int(refunds), int(due))

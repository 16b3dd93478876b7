"""`order-consumer reconcile`: check the invariants on a live database, in one snapshot.

Each check is one set-based query that returns the rows breaking an invariant
(docs/design.md, "Invariants", and the order rules of the payment lifecycle); `CHECKS`
lists them as (name, SQL), so adding a check is adding one entry. `check(conn)`
runs them all in one REPEATABLE READ READ ONLY transaction, so that the report
describes one state of the database even while consumers commit batches: every
check sees the orders, movements and levels the others see. `main` connects,
prints one line per check (or one JSON document with `--json`), and exits 0
when every check holds, 1 on any violation, 2 when the database cannot be used.
With `--with-stripe`, consumer/tools/stripe_books.py's checks of the books against Stripe's
view join the report (2 too when Stripe cannot be read).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from typing import Any

from intentflow.consumer import database
from intentflow.consumer.allocation import UNFILLABLE
from intentflow.consumer.connections import Connection
from intentflow.consumer.exits import EXIT_FOUND, EXIT_OK
from intentflow.consumer.facts import DISPUTE_SETTLED_FOR_US, REFUND_COUNTS, REFUND_STOPPED
from intentflow.consumer.owed import CAPTURED_NOT_RETURNED, sql_list
from intentflow.consumer.policy import DEFAULT_POLICY, ShopPolicy
from intentflow.consumer.settings import ConsumerSettings
from intentflow.consumer.tools import cli, stripe_books
from intentflow.consumer.tools.cli import CannotRun

EXAMPLES = 5


# Rows (alias {}) written since schema version 4, when the rules of issue 17 began.
_SINCE_VERSION_4 = "{}.created_at >= (SELECT applied_at FROM schema_migrations WHERE version = 4)"

# Each query returns one row per violation; its columns are what an example shows.
# A query may read the capture policy of the command's settings as $1.
CHECKS: list[tuple[str, str]] = [
    (
        "one_order_per_intent",
        """
        SELECT payment_intent_id, count(*) AS orders
        FROM orders GROUP BY payment_intent_id HAVING count(*) > 1
        ORDER BY payment_intent_id
        """,
    ),
    (
        "one_order_per_event",
        """
        SELECT event_id, array_agg(DISTINCT order_id ORDER BY order_id) AS order_ids
        FROM inventory_movements
        WHERE event_id IS NOT NULL AND order_id IS NOT NULL
        GROUP BY event_id HAVING count(DISTINCT order_id) > 1
        ORDER BY event_id
        """,
    ),
    (
        "one_movement_per_order_sku_reason",
        """
        SELECT order_id, sku, reason, count(*) AS movements
        FROM inventory_movements WHERE order_id IS NOT NULL
        GROUP BY order_id, sku, reason HAVING count(*) > 1
        ORDER BY order_id, sku, reason
        """,
    ),
    (
        # An order is written in the transaction that claims its source event, so
        # both carry the same now(). Retention (`order-consumer prune`) deletes the
        # inbox oldest first and a transaction's rows whole (consumer/tools/prune.py), so
        # the rows left are every row since the oldest left: orders older than it
        # are not checked, and every younger one's source event must be there.
        "order_source_event_in_inbox",
        """
        SELECT o.id AS order_id, o.payment_intent_id, o.source_event_id
        FROM orders o
        WHERE o.created_at >= (SELECT min(processed_at) FROM processed_events)
          AND NOT EXISTS (SELECT 1 FROM processed_events e WHERE e.event_id = o.source_event_id)
        ORDER BY o.id
        """,
    ),
    (
        "no_negative_level",
        """
        SELECT sku, stocked_quantity AS level
        FROM inventory_levels WHERE stocked_quantity < 0
        ORDER BY sku
        """,
    ),
    (
        # A SKU with movements but no level row counts as level 0, and a level with
        # no movements as a sum of 0.
        "movements_sum_to_levels",
        """
        SELECT coalesce(m.sku, l.sku) AS sku,
               coalesce(m.total, 0) AS movements,
               coalesce(l.stocked_quantity, 0) AS level
        FROM (SELECT sku, sum(quantity_delta) AS total
              FROM inventory_movements GROUP BY sku) m
        FULL JOIN inventory_levels l ON l.sku = m.sku
        WHERE coalesce(m.total, 0) <> coalesce(l.stocked_quantity, 0)
        ORDER BY 1
        """,
    ),
    (
        # A stock row cannot go while movements name its SKU (migration 0005), and
        # the consumer writes no movement without one (orders.py, StockRowMissing):
        # a SKU here lost its row behind both (triggers disabled, a restore of one
        # table). Inserting the row again mends it, and movements_sum_to_levels.
        "movements_have_their_level",
        """
        SELECT m.sku, count(*) AS movements, sum(m.quantity_delta) AS total
        FROM inventory_movements m
        WHERE NOT EXISTS (SELECT 1 FROM inventory_levels l WHERE l.sku = m.sku)
        GROUP BY m.sku
        ORDER BY m.sku
        """,
    ),
    (
        "movements_have_their_order",
        """
        SELECT m.id AS movement_id, m.order_id, m.sku, m.reason
        FROM inventory_movements m
        WHERE m.order_id IS NOT NULL
          AND NOT EXISTS (SELECT 1 FROM orders o WHERE o.id = m.order_id)
        ORDER BY m.id
        """,
    ),
    (
        # A placed order took its items' quantity per SKU (one `order` movement
        # each) and gave it back (one `cancellation` movement) iff it is canceled;
        # any other allocation took nothing and gives nothing back.
        "order_stock_matches_items",
        """
        WITH demand AS (
            SELECT order_id, sku, sum(quantity) AS ordered
            FROM order_items GROUP BY order_id, sku
        ), moved AS (
            SELECT order_id, sku,
                   count(*) AS movements,
                   coalesce(sum(quantity_delta) FILTER (WHERE reason = 'order'), 0) AS taken,
                   coalesce(sum(quantity_delta) FILTER (WHERE reason = 'cancellation'), 0)
                       AS returned,
                   count(*) FILTER (WHERE reason NOT IN ('order', 'cancellation')) AS other
            FROM inventory_movements WHERE order_id IS NOT NULL
            GROUP BY order_id, sku
        )
        SELECT o.id AS order_id, o.payment_intent_id, o.allocation, o.status,
               coalesce(d.sku, m.sku) AS sku, coalesce(d.ordered, 0) AS ordered,
               coalesce(m.taken, 0) AS taken, coalesce(m.returned, 0) AS returned
        FROM orders o
        JOIN (demand d FULL JOIN moved m ON m.order_id = d.order_id AND m.sku = d.sku)
            ON o.id = coalesce(d.order_id, m.order_id)
        WHERE CASE WHEN o.allocation = 'placed' THEN
                  coalesce(m.taken, 0) <> -coalesce(d.ordered, 0)
                  OR coalesce(m.returned, 0)
                     <> CASE WHEN o.status = 'canceled' THEN coalesce(d.ordered, 0) ELSE 0 END
                  OR coalesce(m.other, 0) > 0
              ELSE m.movements IS NOT NULL
              END
        ORDER BY o.id, 5
        """,
    ),
    (
        # Canceled on both sides or on neither; an order needs its intent's row.
        "order_status_matches_intent",
        """
        SELECT o.id AS order_id, o.payment_intent_id, o.status AS order_status,
               p.status AS intent_status
        FROM orders o LEFT JOIN payment_intents p ON p.id = o.payment_intent_id
        WHERE p.id IS NULL
           OR coalesce(p.status = 'canceled', false) <> (o.status = 'canceled')
        ORDER BY o.id
        """,
    ),
    (
        # The order mirrors its intent's facts: refunds, dispute, cancellation
        # reason, what was captured, the capture deadline, the Connect account, and
        # the status `consumer.decisions.order_status` derives from them.
        "order_mirrors_its_intent",
        f"""
        WITH stopped AS (
            -- Refunds made before the charge last spoke that failed or were canceled
            -- after: what the charge says still counts them (consumer/facts.py).
            SELECT p.id, coalesce(sum(r.amount), 0) AS amount
            FROM payment_intents p LEFT JOIN refunds r
              ON r.payment_intent_id = p.id AND r.status IN ({sql_list(REFUND_STOPPED)})
             AND coalesce(r.opened, r.status_created) <= coalesce(p.charge_created, 0)
             AND coalesce(p.charge_created, 0) < r.status_created
            GROUP BY p.id
        ), facts AS (
            SELECT p.id, p.cancellation_reason, p.charge_refunded AND s.amount = 0 AS in_full,
                   p.dispute_status, p.dispute_amount, p.dispute_reason, p.dispute_refundable,
                   p.status = 'canceled' AS canceled,
                   p.amount_received, to_timestamp(p.capture_before) AS capture_before,
                   p.account,
                   greatest(least(greatest(
                       greatest(p.charge_amount_refunded - s.amount, 0),
                       coalesce((SELECT sum(r.amount) FROM refunds r
                                 WHERE r.payment_intent_id = p.id
                                   AND r.status IN ({sql_list(REFUND_COUNTS)})), 0)
                         - p.released), p.amount_received), 0) AS refunded
            FROM payment_intents p JOIN stopped s ON s.id = p.id
        ), expected AS (
            SELECT o.id, o.payment_intent_id, o.status, o.amount_refunded, f.refunded,
                   CASE
                     WHEN f.canceled OR o.allocation = 'skipped' THEN 'canceled'
                     WHEN f.dispute_status IS NOT NULL
                      AND f.dispute_status NOT IN ({sql_list(DISPUTE_SETTLED_FOR_US)})
                       THEN 'disputed'
                     WHEN f.in_full OR (coalesce(nullif(f.amount_received, 0), o.amount) > 0
                          AND f.refunded >= coalesce(nullif(f.amount_received, 0), o.amount))
                       THEN 'refunded'
                     ELSE o.allocation
                   END AS derived,
                   (o.cancellation_reason, o.dispute_status, o.dispute_amount, o.dispute_reason,
                    o.dispute_refundable, o.amount_captured, o.capture_before, o.account)
                     IS DISTINCT FROM
                   (f.cancellation_reason, f.dispute_status, f.dispute_amount, f.dispute_reason,
                    f.dispute_refundable, f.amount_received, f.capture_before, f.account)
                     AS copied_wrong
            FROM orders o JOIN facts f ON f.id = o.payment_intent_id
        )
        SELECT id AS order_id, payment_intent_id, status, derived AS expected_status,
               amount_refunded, refunded AS intent_refunded
        FROM expected
        WHERE status <> derived OR amount_refunded <> refunded OR copied_wrong
        ORDER BY id
        """,
    ),
    (
        # One live order per cart (the unique index keeps it for orders made since
        # version 4; a cart paid twice before then shows here until one of its
        # orders is canceled or refunded).
        "one_live_order_per_cart",
        """
        SELECT cart_id, array_agg(payment_intent_id ORDER BY id) AS payment_intent_ids
        FROM orders
        WHERE cart_id IS NOT NULL AND allocation IN ('placed', 'needs_review')
          AND status NOT IN ('canceled', 'refunded')
        GROUP BY cart_id HAVING count(*) > 1
        ORDER BY cart_id
        """,
    ),
    (
        # Only the shop's payments are orders: since version 4 an intent that names
        # no cart (CART_METADATA_KEY) makes none, and nothing acts on its money.
        "only_the_shops_payments_are_orders",
        f"""
        SELECT o.id AS order_id, o.payment_intent_id, x.name AS stripe_action
        FROM orders o LEFT JOIN outbox x ON x.kind = 'stripe_action' AND x.order_id = o.id
        WHERE o.cart_id IS NULL
          AND ({_SINCE_VERSION_4.format("o")} OR {_SINCE_VERSION_4.format("x")})
        ORDER BY o.id
        """,
    ),
    (
        # Money held for goods we cannot deliver is being released: the cancel is
        # asked for in the transaction that made the order out_of_stock or
        # duplicate (consumer/outbox.py), and Stripe has not refused it for good.
        "held_money_of_unfillable_order_released",
        f"""
        SELECT o.id AS order_id, o.payment_intent_id, o.allocation,
               coalesce(x.state, 'never asked') AS cancel
        FROM orders o JOIN payment_intents p ON p.id = o.payment_intent_id
        LEFT JOIN outbox x ON x.kind = 'stripe_action' AND x.name = 'cancel_payment_intent'
                          AND x.payment_intent_id = o.payment_intent_id
        WHERE o.allocation IN ({sql_list(UNFILLABLE)}) AND p.status = 'requires_capture'
          AND (x.id IS NULL OR x.state = 'failed')
        ORDER BY o.id
        """,
    ),
    (
        # Money captured for goods we cannot deliver is going back: a refund is asked
        # for (whoever captured it, in whichever batch) and is neither refused nor
        # owed (REFUND_UNFILLABLE=false lists every such order here until an
        # operator refunds it). A dispute that holds the money is its own way back.
        "captured_money_of_unfillable_order_returned",
        CAPTURED_NOT_RETURNED,
    ),
    (
        # Under CAPTURE_POLICY=on_placed (this command's own setting) every placed
        # order whose money is still held has its capture asked for: orders placed by
        # a member still on `never` during a rolling change get none, and would lapse.
        # But for the captures Radar holds (an open review, the issuer's fraud warning):
        # the shop settles those (docs/operating.md, "a capture held by Radar").
        "placed_order_capture_asked",
        """
        SELECT o.id AS order_id, o.payment_intent_id, o.capture_before,
               coalesce(x.state, 'never asked') AS capture
        FROM orders o JOIN payment_intents p ON p.id = o.payment_intent_id
        LEFT JOIN outbox x ON x.kind = 'stripe_action' AND x.name = 'capture_payment_intent'
                          AND x.payment_intent_id = o.payment_intent_id
        WHERE $1::text = 'on_placed' AND o.status = 'placed' AND p.status = 'requires_capture'
          AND (x.id IS NULL OR x.state = 'failed')
          AND NOT coalesce(o.review_open, false) AND o.fraud_warning_id IS NULL
        ORDER BY o.capture_before NULLS LAST, o.id
        """,
    ),
]


@dataclass(frozen=True)
class CheckResult:
    name: str
    violations: int
    examples: list[dict[str, Any]]  # up to EXAMPLES rows, column -> value

    @property
    def ok(self) -> bool:
        return self.violations == 0

    def line(self) -> str:
        if self.ok:
            return f"{self.name}: OK"
        noun = "violation" if self.violations == 1 else "violations"
        shown = "; ".join(" ".join(f"{k}={v}" for k, v in ex.items()) for ex in self.examples)
        return f"{self.name}: {self.violations} {noun}, e.g. {shown}"


@dataclass(frozen=True)
class Report:
    checks: list[CheckResult]

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    def failed(self) -> dict[str, CheckResult]:
        return {c.name: c for c in self.checks if not c.ok}

    def as_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "checks": [
                {"name": c.name, "ok": c.ok, "violations": c.violations, "examples": c.examples}
                for c in self.checks
            ],
        }


async def check(conn: Connection, policy: ShopPolicy = DEFAULT_POLICY) -> Report:
    """Run every check in one snapshot of the database, under the shop's `policy`."""
    results = []
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        for name, sql in CHECKS:
            args = (str(policy.capture),) if "$1" in sql else ()
            # The count is taken over every violation before LIMIT keeps the examples.
            rows = await conn.fetch(
                f"SELECT count(*) OVER () AS violations__, v.* FROM ({sql}) v LIMIT {EXAMPLES}",
                *args,
            )
            violations = int(rows[0]["violations__"]) if rows else 0
            examples = [{k: v for k, v in row.items() if k != "violations__"} for row in rows]
            results.append(CheckResult(name, violations, examples))
    return Report(results)


def add_parser(commands: Any) -> None:
    parser = commands.add_parser(
        "reconcile",
        help="check the invariants on the database (exit 1 on any violation)",
        description="Check the invariants on the database in one snapshot; exit 0 when "
        "every check holds, 1 on any violation, 2 when the database (or, --with-stripe, "
        "Stripe) cannot be used. Guide: docs/operating.md, `Checking the invariants`; "
        "settings: README, `Consumer configuration (environment)`.",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    stripe_books.add_arguments(parser)


async def main(args: argparse.Namespace, settings: ConsumerSettings) -> int:
    if (refused := stripe_books.refusal(args, settings)) is not None:
        raise CannotRun(refused)
    conn = await cli.connect(settings, "reconcile")
    try:
        report = await check(conn, ShopPolicy.from_settings(settings))
        if args.with_stripe:
            found = await stripe_books.check(conn, settings, args, EXAMPLES)
            report = Report(report.checks + [CheckResult(*result) for result in found])
    except Exception as exc:
        raise cli.unusable(exc, settings) from None
    finally:
        await database.close(conn, settings.db_connect_timeout_s)
    if args.json:
        print(json.dumps(report.as_dict(), default=str))
    else:
        for result in report.checks:
            print(result.line())
    return EXIT_OK if report.ok else EXIT_FOUND

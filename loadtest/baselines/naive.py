"""The webhook handler from the problem statement, as most shops write it.

On an authorization (`payment_intent.amount_capturable_updated`, or
`payment_intent.succeeded` for automatic capture), in one READ COMMITTED
transaction on the sender's connection:
  1. look for an order with the event's payment intent; if there is one, stop;
  2. read the cart named by the intent's `metadata.cart_id`;
  3. (`pause`, when given: the slow part of a real handler, between the check and
     the write, e.g. a call to Stripe or a tax service; the lease baseline stalls here)
  4. check each cart line against the stock level, one line at a time;
  5. create the order, `placed` if every line had stock, else `out_of_stock`,
     and its lines;
  6. if placed, decrement each line's SKU (`quantity = quantity - n`).
Every other event type is acknowledged and ignored.

Nothing here is rigged to fail: it is the code that passes a review and every
test that delivers one event at a time. What it lacks is what intentflow has:
no UNIQUE on `orders.payment_intent_id`, no lock on the stock rows between the
check and the decrement, no CHECK that a level stays at or above zero, and the
check is per line rather than per SKU. Two copies of one event that arrive at
the same moment both find no order; two orders that check the last units of a
SKU at the same moment both find them there.

Its tables live in a schema of their own (`Shop(schema)`), seeded from the same
workload as intentflow's: `inventory`, `carts`, `cart_lines`, `orders`,
`order_lines`.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg

from intentflow.consumer.connections import Connection
from intentflow.loadtest.workload import Workload

# The event types that mean "the customer paid (or authorized) for the cart".
AUTHORIZATIONS = frozenset({"payment_intent.amount_capturable_updated", "payment_intent.succeeded"})

# What `handle` did with one delivery.
IGNORED, EXISTS, PLACED, OUT_OF_STOCK = "ignored", "exists", "placed", "out_of_stock"

Pause = Callable[[], Awaitable[None]]

_IDENTIFIER = re.compile(r"[a-z_][a-z0-9_]*")

_TABLES = """
CREATE SCHEMA {s};
CREATE TABLE {s}.inventory (sku text PRIMARY KEY, quantity integer NOT NULL);
CREATE TABLE {s}.carts (id text PRIMARY KEY, currency text NOT NULL);
CREATE TABLE {s}.cart_lines (
    cart_id text NOT NULL, sku text NOT NULL, quantity integer NOT NULL, unit_amount bigint NOT NULL
);
CREATE INDEX ON {s}.cart_lines (cart_id);
CREATE TABLE {s}.orders (
    id                bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    payment_intent_id text NOT NULL,
    cart_id           text,
    status            text NOT NULL,
    amount            bigint NOT NULL,
    created_at        timestamptz NOT NULL DEFAULT now()
);
-- An index for the lookup, as any shop has; not UNIQUE, as most have not.
CREATE INDEX ON {s}.orders (payment_intent_id);
CREATE TABLE {s}.order_lines (
    order_id bigint NOT NULL, sku text NOT NULL, quantity integer NOT NULL,
    unit_amount bigint NOT NULL
);
CREATE INDEX ON {s}.order_lines (order_id);
"""


def intent_of(event: dict[str, Any]) -> dict[str, Any]:
    """The PaymentIntent an authorization event carries."""
    obj: dict[str, Any] = event["data"]["object"]
    return obj


class Shop:
    """A storefront's tables in one schema, and its webhook handler."""

    def __init__(self, schema: str) -> None:
        if not _IDENTIFIER.fullmatch(schema):
            raise ValueError(f"not a plain schema name: {schema!r}")
        self.schema = schema

    async def create(self, conn: asyncpg.Connection, workload: Workload) -> None:
        """Create the schema's tables and load the workload's stock and carts."""
        await self.create_tables(conn)
        await self.seed(conn, workload)

    async def create_tables(self, conn: asyncpg.Connection) -> None:
        await conn.execute(_TABLES.format(s=self.schema))

    async def seed(self, conn: asyncpg.Connection, workload: Workload) -> None:
        await conn.copy_records_to_table(
            "inventory",
            schema_name=self.schema,
            records=list(workload.stock.items()),
            columns=["sku", "quantity"],
        )
        await conn.copy_records_to_table(
            "carts",
            schema_name=self.schema,
            records=[(c.id, c.currency) for c in workload.carts],
            columns=["id", "currency"],
        )
        await conn.copy_records_to_table(
            "cart_lines",
            schema_name=self.schema,
            records=[(c.id, *line) for c in workload.carts for line in c.lines],
            columns=["cart_id", "sku", "quantity", "unit_amount"],
        )
        await conn.execute(f"ANALYZE {self.schema}.inventory, {self.schema}.cart_lines")

    async def handle(
        self, conn: Connection, event: dict[str, Any], pause: Pause | None = None
    ) -> str:
        """Apply one delivery; return IGNORED, EXISTS, PLACED or OUT_OF_STOCK."""
        if event["type"] not in AUTHORIZATIONS:
            return IGNORED
        s = self.schema
        intent = intent_of(event)
        async with conn.transaction():  # READ COMMITTED: PostgreSQL's default
            existing = await conn.fetchval(
                f"SELECT id FROM {s}.orders WHERE payment_intent_id = $1", intent["id"]
            )
            if existing is not None:
                return EXISTS
            cart_id = intent.get("metadata", {}).get("cart_id")
            lines = await conn.fetch(
                f"SELECT sku, quantity, unit_amount FROM {s}.cart_lines WHERE cart_id = $1",
                cart_id,
            )
            if pause is not None:
                await pause()
            in_stock = bool(lines)
            for line in lines:
                have = await conn.fetchval(
                    f"SELECT quantity FROM {s}.inventory WHERE sku = $1", line["sku"]
                )
                if have is None or have < line["quantity"]:
                    in_stock = False
                    break
            status = PLACED if in_stock else OUT_OF_STOCK
            order_id = await conn.fetchval(
                f"INSERT INTO {s}.orders (payment_intent_id, cart_id, status, amount)"
                " VALUES ($1, $2, $3, $4) RETURNING id",
                intent["id"],
                cart_id,
                status,
                intent["amount"],
            )
            await conn.executemany(
                f"INSERT INTO {s}.order_lines (order_id, sku, quantity, unit_amount)"
                " VALUES ($1, $2, $3, $4)",
                [(order_id, r["sku"], r["quantity"], r["unit_amount"]) for r in lines],
            )
            if status == PLACED:
                for line in lines:
                    await conn.execute(
                        f"UPDATE {s}.inventory SET quantity = quantity - $2 WHERE sku = $1",
                        line["sku"],
                        line["quantity"],
                    )
        return status

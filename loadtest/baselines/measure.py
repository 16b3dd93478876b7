"""What a contender did to orders and stock, read back from its tables after a run.

The same SQL reads a shop's schema (`shop_tables`) and intentflow's
(`INTENTFLOW`). An order "took stock" when its allocation placed it (a shop's
`status = 'placed'`, intentflow's `allocation = 'placed'`); the comparison's
workload has no cancellations or refunds, so nothing gives stock back.

- duplicate orders: orders beyond one per payment intent,
  `count(*) - count(DISTINCT payment_intent_id)`, whatever their status;
- oversold units: per SKU, units on the lines of every order that took stock
  (duplicates included: each was confirmed to a customer) beyond the SKU's
  initial stock, summed over SKUs: `sum(max(0, sold - initial))`;
- stock left: the sum of the stock levels now;
- expected stock left: the sum of the initial levels minus the units of one
  order per payment intent that took stock (its first, by order id), i.e. what
  the levels would be had every intent this contender gave stock to taken it
  once. The gap between the two is the stock that duplicate orders took (or a
  lost update gave back); it does not judge which intents got stock, which a
  correct contender may decide differently in a different arrival order;
- missing orders: authorized payment intents with no order at all.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass

import asyncpg


@dataclass(frozen=True)
class Tables:
    orders: str  # (id, payment_intent_id, …)
    lines: str  # (order_id, sku, quantity)
    inventory: str  # (sku, <level>)
    level: str  # the stock level's column
    took_stock: str  # a condition on the order `o`


INTENTFLOW = Tables(
    "public.orders",
    "public.order_items",
    "public.inventory_levels",
    "stocked_quantity",
    "o.allocation = 'placed'",
)


def shop_tables(schema: str) -> Tables:
    """The tables of `naive.Shop(schema)`."""
    s = schema
    return Tables(
        f"{s}.orders", f"{s}.order_lines", f"{s}.inventory", "quantity", "o.status = 'placed'"
    )


@dataclass(frozen=True)
class Outcome:
    orders: int
    intents_with_order: int
    duplicate_orders: int
    oversold_units: int
    stock_left: int
    expected_stock_left: int
    missing_orders: int


async def duplicate_orders(conn: asyncpg.Connection, t: Tables) -> int:
    value = await conn.fetchval(
        f"SELECT count(*) - count(DISTINCT payment_intent_id) FROM {t.orders}"
    )
    return int(value)


async def oversold_units(conn: asyncpg.Connection, t: Tables, initial: Mapping[str, int]) -> int:
    value = await conn.fetchval(
        f"""
        WITH initial AS (SELECT * FROM unnest($1::text[], $2::int[]) AS i (sku, quantity)),
             sold AS (SELECT l.sku, sum(l.quantity) AS units
                      FROM {t.orders} o JOIN {t.lines} l ON l.order_id = o.id
                      WHERE {t.took_stock} GROUP BY l.sku)
        SELECT coalesce(sum(greatest(0, s.units - coalesce(i.quantity, 0))), 0)
        FROM sold s LEFT JOIN initial i USING (sku)
        """,
        list(initial),
        list(initial.values()),
    )
    return int(value)


async def stock_left(conn: asyncpg.Connection, t: Tables) -> int:
    return int(await conn.fetchval(f"SELECT coalesce(sum({t.level}), 0) FROM {t.inventory}"))


async def expected_stock_left(
    conn: asyncpg.Connection, t: Tables, initial: Mapping[str, int]
) -> int:
    taken_once = await conn.fetchval(
        f"""
        WITH first AS (SELECT DISTINCT ON (o.payment_intent_id) o.id
                       FROM {t.orders} o WHERE {t.took_stock}
                       ORDER BY o.payment_intent_id, o.id)
        SELECT coalesce(sum(l.quantity), 0) FROM first f JOIN {t.lines} l ON l.order_id = f.id
        """
    )
    return sum(initial.values()) - int(taken_once)


async def measure(
    conn: asyncpg.Connection, t: Tables, initial: Mapping[str, int], authorized: Collection[str]
) -> Outcome:
    """Every count above; `authorized` are the payment intents that were authorized."""
    wanted = set(authorized)
    row = await conn.fetchrow(
        f"""
        SELECT count(*) AS orders, count(DISTINCT payment_intent_id) AS intents,
               count(DISTINCT payment_intent_id)
                   FILTER (WHERE payment_intent_id = ANY($1::text[])) AS authorized_with_order
        FROM {t.orders}
        """,
        list(wanted),
    )
    assert row is not None  # an aggregate without GROUP BY returns one row
    return Outcome(
        orders=row["orders"],
        intents_with_order=row["intents"],
        duplicate_orders=await duplicate_orders(conn, t),
        oversold_units=await oversold_units(conn, t, initial),
        stock_left=await stock_left(conn, t),
        expected_stock_left=await expected_stock_left(conn, t, initial),
        missing_orders=len(wanted) - row["authorized_with_order"],
    )

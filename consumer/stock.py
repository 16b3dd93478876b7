"""Stock: what orders take and give back, as movements, and the levels they change.

Inside the batch's transaction (consumer/orders.py): the rows of the SKUs a
batch touches are locked in SKU order (`lock_stock`, invariant 8); each change
of a level is written as a movement that says why (`move_stock`, invariant 4),
and a canceled placed order gives back exactly what it took (`taken_by`).
"""

from __future__ import annotations

from collections import Counter

from intentflow.consumer.connections import Connection

# (sku, delta, reason, order id, event id)
Movement = tuple[str, int, str, int, str]


async def taken_by(conn: Connection, placed: dict[int, str]) -> list[Movement]:
    """What each newly canceled, placed order (order id -> the canceling event's id) took:
    the movements that give it back."""
    if not placed:
        return []
    rows = await conn.fetch(
        """
        SELECT order_id, sku, -sum(quantity_delta)::int AS qty FROM inventory_movements
        WHERE order_id = ANY($1::bigint[]) AND reason = 'order'
        GROUP BY order_id, sku ORDER BY order_id, sku
        """,
        sorted(placed),
    )
    return [
        (r["sku"], r["qty"], "cancellation", r["order_id"], placed[r["order_id"]])
        for r in rows
        if r["qty"] > 0
    ]


async def lock_stock(conn: Connection, skus: list[str]) -> dict[str, int]:
    if not skus:
        return {}
    rows = await conn.fetch(
        """
        SELECT sku, stocked_quantity FROM inventory_levels
        WHERE sku = ANY($1::text[]) ORDER BY sku FOR UPDATE
        """,
        skus,
    )
    return {r["sku"]: r["stocked_quantity"] for r in rows}


class StockRowMissing(Exception):
    """Movements for SKUs that have no inventory_levels row: the batch waits for an operator.

    Not the event's fault, so never dead-lettered: the row was removed behind the
    database's refusal (migration 0005), and inserting it again mends the books
    (its trigger records what makes the movements sum to the level put in).
    """

    retriable = True  # consumer.errors: the environment's, not the event's
    cause = "stock_row_missing"

    def __init__(self, skus: list[str]) -> None:
        named = ", ".join(repr(sku) for sku in skus[:5])
        if len(skus) > 5:
            named += f" and {len(skus) - 5} more"
        super().__init__(
            f"no inventory_levels row for SKU {named}, whose stock this batch moves: insert one "
            "with the quantity on hand (its movements are kept); the batch is retried until then"
        )
        self.skus = skus


async def move_stock(conn: Connection, movements: list[Movement]) -> None:
    """Write the movements and change each level by their sum (rows locked by `lock_stock`).

    Raises StockRowMissing when a movement's SKU has no level row, which would
    otherwise take the movement into the books and change no level.
    """
    if not movements:
        return
    await conn.execute(
        """
        INSERT INTO inventory_movements (sku, quantity_delta, reason, order_id, event_id)
        SELECT * FROM unnest($1::text[], $2::int[], $3::text[], $4::bigint[], $5::text[])
        """,
        [m[0] for m in movements],
        [m[1] for m in movements],
        [m[2] for m in movements],
        [m[3] for m in movements],
        [m[4] for m in movements],
    )
    net: Counter[str] = Counter()
    for sku, delta, *_ in movements:
        net[sku] += delta
    skus = sorted(net)
    # One statement, as before: SKUs whose movements cancel out change no level
    # but need their row all the same.
    missing: list[str] = await conn.fetchval(
        """
        WITH t AS (SELECT * FROM unnest($1::text[], $2::int[]) AS t(sku, delta)),
        moved AS (
            UPDATE inventory_levels l
            SET stocked_quantity = l.stocked_quantity + t.delta, updated_at = now()
            FROM t WHERE l.sku = t.sku AND t.delta <> 0
        )
        SELECT coalesce(array_agg(t.sku ORDER BY t.sku), '{}') FROM t
        WHERE NOT EXISTS (SELECT 1 FROM inventory_levels l WHERE l.sku = t.sku)
        """,
        skus,
        [net[s] for s in skus],
    )
    if missing:
        raise StockRowMissing(missing)

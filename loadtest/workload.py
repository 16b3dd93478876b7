"""Generated storefront workloads: stock, carts, and the Stripe events that pay for them.

Each intent has a cart of `lines_per_cart` lines, an authorization event, and
(for `capture_ratio` of intents) a later capture, of which `refund_ratio` are
then refunded in full; `cancel_ratio` of the intents that are not captured are
canceled, a third of those with the cancellation published before the
authorization, the rest after every authorization. Every event is delivered 1
to `max_copies` times, the extra copies at random later positions, as Stripe's
retries arrive.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

import asyncpg

from stripekit import events


@dataclass(frozen=True)
class CartSpec:
    id: str
    currency: str
    lines: tuple[tuple[str, int, int], ...]  # (sku, quantity, unit_amount)

    @property
    def total(self) -> int:
        return sum(q * u for _, q, u in self.lines)


@dataclass
class Workload:
    stock: dict[str, int]
    carts: list[CartSpec]
    deliveries: list[dict[str, Any]]  # in publish order, duplicates included
    distinct_events: int
    intents: list[str] = field(default_factory=list)

    @property
    def duplicates(self) -> int:
        return len(self.deliveries) - self.distinct_events


def generate(
    intents: int,
    *,
    skus: int = 200,
    lines_per_cart: int = 3,
    max_copies: int = 3,
    capture_ratio: float = 0.5,
    cancel_ratio: float = 0.0,
    refund_ratio: float = 0.0,
    stock_per_sku: int | None = None,
    seed: int = 7,
    prefix: str = "",
) -> Workload:
    rng = random.Random(seed)
    sku_names = [f"{prefix}sku-{i:05d}" for i in range(skus)]
    carts: list[CartSpec] = []
    firsts: list[dict[str, Any]] = []
    later: list[dict[str, Any]] = []
    intent_ids = []
    for i in range(intents):
        cart_id = f"{prefix}cart-{i:07d}"
        chosen = rng.sample(sku_names, k=min(lines_per_cart, skus))
        lines = tuple((sku, rng.randint(1, 3), rng.choice((499, 1250, 2999))) for sku in chosen)
        cart = CartSpec(cart_id, "usd", lines)
        carts.append(cart)
        intent_id = f"pi_{prefix}{i:07d}"
        intent_ids.append(intent_id)
        auth = events.intent_event(intent_id, amount=cart.total, cart_id=cart_id)
        firsts.append(auth)
        if rng.random() < capture_ratio:
            firsts.append(
                events.intent_event(
                    intent_id, amount=cart.total, cart_id=cart_id, status="succeeded"
                )
            )
            if refund_ratio and rng.random() < refund_ratio:
                later.append(events.refund_event(intent_id, amount=cart.total))
        elif cancel_ratio and rng.random() < cancel_ratio:
            cancel = events.intent_event(
                intent_id, amount=cart.total, cart_id=cart_id, status="canceled"
            )
            if rng.random() < 1 / 3:
                firsts.insert(len(firsts) - 1, cancel)  # delivered before its authorization
            else:
                later.append(cancel)
    # Cancellations and refunds come hours later, after every authorization.
    firsts.extend(later)
    # A retry arrives after the first delivery, anywhere later in the stream.
    keyed = [(float(i), evt) for i, evt in enumerate(firsts)]
    for i, evt in enumerate(firsts):
        for _ in range(rng.randint(1, max_copies) - 1):
            keyed.append((rng.uniform(i, len(firsts)), evt))
    keyed.sort(key=lambda pair: pair[0])
    deliveries = [evt for _, evt in keyed]
    if stock_per_sku is None:
        # Enough for every order on average, so most place and some SKUs run short.
        stock_per_sku = max(1, intents * lines_per_cart * 2 // skus)
    stock = dict.fromkeys(sku_names, stock_per_sku)
    return Workload(stock, carts, deliveries, len(firsts), intent_ids)


async def seed_database(conn: asyncpg.Connection, workload: Workload) -> None:
    """Load the workload's stock and carts with COPY."""
    await conn.copy_records_to_table(
        "inventory_levels",
        records=list(workload.stock.items()),
        columns=["sku", "stocked_quantity"],
    )
    await conn.copy_records_to_table(
        "carts", records=[(c.id, c.currency) for c in workload.carts], columns=["id", "currency"]
    )
    await conn.copy_records_to_table(
        "cart_items",
        records=[(c.id, *line) for c in workload.carts for line in c.lines],
        columns=["cart_id", "sku", "quantity", "unit_amount"],
    )

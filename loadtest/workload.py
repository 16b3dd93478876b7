"""Generated storefront workloads: stock, carts, and the Stripe events that pay for them.

Two shapes. `scenario` (the harness, `replay-duplicates`): every intent's whole
Stripe history with the fate it implies, delivered later by `loadtest.delivery`
with duplicates and reordering. `generate` (the consumer bench and the
baselines' comparison): authorizations and captures with their duplicates
already interleaved, for bulk publishing.

In `generate`, each intent has a cart of `lines_per_cart` lines, an authorization event, and
(for `capture_ratio` of intents) a later capture, of which `refund_ratio` are
then refunded in full; `cancel_ratio` of the intents that are not captured are
canceled, a third of those with the cancellation published before the
authorization, the rest after every authorization. Every event is delivered 1
to `max_copies` times, the extra copies at random later positions, as Stripe's
retries arrive.
"""

from __future__ import annotations

import random
import time
from collections import Counter
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, NamedTuple

import asyncpg

from intentflow.loadtest.checkout import CHECKOUT_SHARE, Checkout
from intentflow.loadtest.checkout import draw as draw_checkout
from intentflow.schemas import payment_intent_key
from intentflow.stripekit import events


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


def slice_workload(workload: Workload, intents: int) -> Workload:
    """The first `intents` intents of `workload`, their deliveries in the same order.

    Stock per SKU is scaled with the slice, so about as many orders run short.
    """
    if intents >= len(workload.intents):
        return workload
    keep = set(workload.intents[:intents])
    deliveries = [d for d in workload.deliveries if payment_intent_key(d) in keep]
    distinct = len({d["id"] for d in deliveries})
    scale = intents / len(workload.intents)
    stock = {sku: max(1, round(q * scale)) for sku, q in workload.stock.items()}
    return Workload(
        stock, workload.carts[:intents], deliveries, distinct, workload.intents[:intents]
    )


async def seed_database(conn: asyncpg.Connection, workload: Workload) -> None:
    """Load the workload's stock and carts with COPY."""
    await _seed(conn, workload.stock, workload.carts)


async def _seed(conn: asyncpg.Connection, stock: dict[str, int], carts: list[CartSpec]) -> None:
    await conn.copy_records_to_table(
        "inventory_levels", records=list(stock.items()), columns=["sku", "stocked_quantity"]
    )
    await conn.copy_records_to_table(
        "carts", records=[(c.id, c.currency) for c in carts], columns=["id", "currency"]
    )
    await conn.copy_records_to_table(
        "cart_items",
        records=[(c.id, *line) for c in carts for line in c.lines],
        columns=["cart_id", "sku", "quantity", "unit_amount"],
    )


# --- Stripe histories: what the harness replays -----------------------------------


class Fate(StrEnum):
    """How one payment intent's story ends, and so what its order must show."""

    ABANDONED = "abandoned"  # never authorized (3-D Secure not completed), then canceled: no order
    HELD = "held"  # authorized, nothing more yet: placed or out_of_stock
    CAPTURED = "captured"  # authorized, then captured: placed or out_of_stock
    PARTLY_REFUNDED = "partly_refunded"  # captured, part of it refunded hours later
    REFUNDED = "refunded"  # captured, then refunded in full hours later
    CANCELED = "canceled"  # authorized, then canceled (by the shop or the customer)
    EXPIRED = "expired"  # authorized, never captured: the authorization lapsed after 7 days
    MISMATCH = "mismatch"  # authorized for an amount that is not the cart's: needs_review
    # A delayed payment method through Checkout (a bank debit) that failed days later:
    # never paid, so no order.
    DELAYED_FAILED = "delayed_failed"

    def statuses(self) -> frozenset[str]:
        """The order statuses this fate allows; empty when there must be no order."""
        return _STATUSES[self]

    @property
    def keeps_stock(self) -> bool:
        """Whether an order of this fate that was placed still holds its stock at the end."""
        return self in (Fate.HELD, Fate.CAPTURED, Fate.PARTLY_REFUNDED, Fate.REFUNDED)


_ALLOCATED = frozenset({"placed", "out_of_stock"})
_STATUSES: dict[Fate, frozenset[str]] = {
    Fate.ABANDONED: frozenset(),
    Fate.HELD: _ALLOCATED,
    Fate.CAPTURED: _ALLOCATED,
    Fate.PARTLY_REFUNDED: _ALLOCATED,
    Fate.REFUNDED: frozenset({"refunded"}),
    Fate.CANCELED: frozenset({"canceled"}),
    Fate.EXPIRED: frozenset({"canceled"}),
    Fate.MISMATCH: frozenset({"needs_review"}),
    Fate.DELAYED_FAILED: frozenset(),
}
# The fates whose money is received: captured, whatever follows.
_PAID = (Fate.CAPTURED, Fate.PARTLY_REFUNDED, Fate.REFUNDED)

# (fate, weight): the mix of a storefront that authorizes, then captures when it ships.
FATES: tuple[tuple[Fate, int], ...] = (
    (Fate.ABANDONED, 5),
    (Fate.HELD, 20),
    (Fate.CAPTURED, 35),
    (Fate.PARTLY_REFUNDED, 5),
    (Fate.REFUNDED, 10),
    (Fate.CANCELED, 15),
    (Fate.EXPIRED, 5),
    (Fate.MISMATCH, 5),
    (Fate.DELAYED_FAILED, 2),
)


class Amounts(NamedTuple):
    """What an order keeps of what its buyer was asked to pay."""

    amount: int  # the total asked
    subtotal: int  # what the cart is checked against: the items (the amount, but for Checkout)
    shipping: int = 0
    discount: int = 0
    tax: int = 0


@dataclass(frozen=True)
class History:
    """One payment intent: its cart, its fate and Stripe's events for it, in Stripe's order."""

    intent_id: str
    cart: CartSpec
    fate: Fate
    events: tuple[dict[str, Any], ...]

    @property
    def intent_status(self) -> str:
        """The intent's status at the end of its history: its last `payment_intent.*` event's."""
        objects = [e["data"]["object"] for e in self.events]
        return str([o for o in objects if o.get("object") == "payment_intent"][-1]["status"])

    @property
    def cancellation_reason(self) -> str | None:
        reasons = [
            e["data"]["object"].get("cancellation_reason")
            for e in self.events
            if e["type"] == "payment_intent.canceled"
        ]
        return reasons[-1] if reasons else None

    @property
    def amount_refunded(self) -> int:
        """Captured money given back: the most a `charge.refunded` event says. An expired
        authorization's release (`charge.expired`) took no money, so refunds none."""
        return max(
            (
                int(e["data"]["object"]["amount_refunded"])
                for e in self.events
                if e["type"] == "charge.refunded"
            ),
            default=0,
        )

    @property
    def amounts(self) -> Amounts:
        """What its order must keep: the intent's amount and, for a purchase through
        Checkout, its session's items, shipping, discount and tax."""
        objects = [e["data"]["object"] for e in self.events]
        intent = [o for o in objects if o.get("object") == "payment_intent"][-1]
        sessions = [o for o in objects if o.get("object") == "checkout.session"]
        if not sessions:
            return Amounts(intent["amount"], intent["amount"])
        details = sessions[-1]["total_details"]
        return Amounts(
            intent["amount"],
            sessions[-1]["amount_subtotal"],
            details["amount_shipping"],
            details["amount_discount"],
            details["amount_tax"],
        )


@dataclass
class Scenario:
    """Stock, carts and every intent's history: the input of one replay."""

    stock: dict[str, int]
    histories: list[History]
    seed: int

    @property
    def carts(self) -> list[CartSpec]:
        return [h.cart for h in self.histories]

    @property
    def intents(self) -> list[str]:
        return [h.intent_id for h in self.histories]

    @property
    def events(self) -> list[dict[str, Any]]:
        return [e for h in self.histories for e in h.events]

    def by_fate(self) -> Counter[Fate]:
        return Counter(h.fate for h in self.histories)


_HOUR = 3600
_DAY = 24 * _HOUR


def scenario(
    intents: int,
    *,
    seed: int = 7,
    skus: int | None = None,
    stock_ratio: float = 0.8,
    prefix: str = "",
) -> Scenario:
    """`intents` payment intents with carts, stock and plausible Stripe histories.

    Carts have 1-5 lines drawn from a catalogue where a few SKUs are popular
    (so carts share them), and one cart in ten repeats a SKU on two lines.
    Stock per SKU is `stock_ratio` of what the carts ask for it, so popular
    SKUs run out. About a third of the purchases go through Stripe Checkout
    (loadtest/checkout.py), some of them by a delayed payment method. The same
    `seed` gives the same scenario, event ids included.
    """
    rng = random.Random(seed)
    skus = skus or max(10, intents // 8)
    names = [f"{prefix}sku-{i:05d}" for i in range(skus)]
    popularity = [1 / (rank + 1) ** 0.8 for rank in range(skus)]  # a long tail
    fates = [f for f, _ in FATES]
    weights = [w for _, w in FATES]
    clock = int(time.time()) - 10 * _DAY
    histories: list[History] = []
    wanted: Counter[str] = Counter()
    for i in range(intents):
        chosen = rng.choices(names, popularity, k=rng.randint(1, 5))
        if rng.random() < 0.1:
            chosen.append(chosen[0])  # the same SKU on a second line
        lines = tuple((sku, rng.randint(1, 3), rng.choice((499, 1250, 2999))) for sku in chosen)
        cart = CartSpec(f"{prefix}cart-{seed}-{i:07d}", "usd", lines)
        fate = rng.choices(fates, weights)[0]
        if fate not in (Fate.ABANDONED, Fate.MISMATCH, Fate.DELAYED_FAILED):
            for sku, quantity, _ in lines:
                wanted[sku] += quantity
        intent_id = f"pi_{prefix}{seed}x{i:07d}"
        clock += rng.randint(0, 3)
        histories.append(
            History(intent_id, cart, fate, tuple(_history(rng, intent_id, cart, fate, clock)))
        )
    stock = {sku: max(1, int(wanted[sku] * stock_ratio)) for sku in names}
    return Scenario(stock, histories, seed)


def _history(
    rng: random.Random, intent_id: str, cart: CartSpec, fate: Fate, created: int
) -> list[dict[str, Any]]:
    """Stripe's events for one intent, each `created` no earlier than the one before."""
    subtotal = cart.total + (rng.randint(1, 500) if fate is Fate.MISMATCH else 0)
    tell = _Teller(rng, intent_id, cart, created, _through_checkout(rng, subtotal, fate), subtotal)
    out, at = _payment(rng, tell, fate)
    amount = tell.amount
    if fate in (Fate.PARTLY_REFUNDED, Fate.REFUNDED):
        back = amount if fate is Fate.REFUNDED else max(1, amount // 3)
        at += rng.randint(2 * _HOUR, 5 * _DAY)
        refund = events.refunded_event(intent_id, amount=amount, amount_refunded=back, created=at)
        out.append(_with_id(refund, tell.ids.next()))
    elif fate is Fate.CANCELED:
        at += rng.randint(60, _DAY)
        out.append(_canceled(tell.intent("canceled", at), "requested_by_customer"))
    elif fate is Fate.EXPIRED:
        at = created + 7 * _DAY
        expired = events.expired_event(intent_id, amount=amount, created=at)
        out.append(_with_id(expired, tell.ids.next()))
        out.append(_canceled(tell.intent("canceled", at + 1), "automatic"))
    return out


def _payment(rng: random.Random, tell: _Teller, fate: Fate) -> tuple[list[dict[str, Any]], int]:
    """The events until the money is held or received (or never will be), and the second
    of the last."""
    via, created = tell.via, tell.created
    out = [tell.intent("requires_payment_method", created, "payment_intent.created")]
    at = created + rng.randint(1, 20)
    if via is not None and via.delayed:
        # A bank debit: processing while the bank is asked, the session complete but unpaid,
        # and the money there (or not) days later.
        out += [tell.intent("processing", at), tell.session("unpaid", at)]
        at += rng.randint(1, 4) * _DAY
        if fate is Fate.DELAYED_FAILED:
            failed = tell.intent("requires_payment_method", at, "payment_intent.payment_failed")
            settled = tell.session("unpaid", at, "checkout.session.async_payment_failed")
            return [*out, failed, settled], at
        settled = tell.session("paid", at, "checkout.session.async_payment_succeeded")
        return [*out, tell.intent("succeeded", at), settled], at
    if rng.random() < 0.3:  # the bank asked for 3-D Secure
        out.append(tell.intent("requires_action", at))
        at += rng.randint(5, 60)
    if fate is Fate.ABANDONED:
        out.append(_canceled(tell.intent("canceled", at + _HOUR), "abandoned"))
        return out, at
    if via is not None and fate in _PAID and rng.random() < 0.5:
        # A card through Checkout, captured at once: the session completes paid.
        return [*out, tell.intent("succeeded", at), tell.session("paid", at)], at
    out.append(tell.intent("requires_capture", at))
    if via is not None:
        out.append(tell.session("unpaid", at))  # held, not captured: Checkout says unpaid
    if fate in _PAID:
        at += rng.randint(10 * 60, 2 * _DAY)  # captured when it ships
        out.append(tell.intent("succeeded", at))
    return out, at


class _Teller:
    """Stripe's events about one intent: the intent in a status, its Checkout Session."""

    def __init__(
        self,
        rng: random.Random,
        intent_id: str,
        cart: CartSpec,
        created: int,
        via: Checkout | None,
        subtotal: int,
    ) -> None:
        self.intent_id, self.cart, self.created, self.via = intent_id, cart, created, via
        self.amount = via.total if via is not None else subtotal
        # Through Checkout the cart rides on the session, and on the intent if the shop
        # copies it there.
        self._named = cart.id if via is None or via.on_intent else None
        self.ids = _EventIds(rng, intent_id)

    def intent(self, status: str, at: int, event_type: str | None = None) -> dict[str, Any]:
        obj = events.payment_intent(
            self.intent_id,
            amount=self.amount,
            status=status,
            cart_id=self._named,
            created=self.created,
        )
        kind = event_type or events.EVENT_TYPE_OF_STATUS[status]
        return _at(events.event(obj, kind, event_id=self.ids.next()), at)

    def session(
        self, payment_status: str, at: int, event_type: str = "checkout.session.completed"
    ) -> dict[str, Any]:
        assert self.via is not None
        return self.via.session(
            self.intent_id, self.cart.id, payment_status, event_type,
            event_id=self.ids.next(), created=self.created, at=at,
        )  # fmt: skip


def _through_checkout(rng: random.Random, subtotal: int, fate: Fate) -> Checkout | None:
    """How a share of the purchases go through Checkout; None for the rest. A delayed
    payment that failed always does; one abandoned at 3-D Secure stays a direct intent
    (what Stripe sends when a session with a canceled intent expires is not modelled)."""
    if fate is Fate.ABANDONED:
        return None
    if fate is not Fate.DELAYED_FAILED and rng.random() >= CHECKOUT_SHARE:
        return None
    return draw_checkout(rng, subtotal, paid=fate in _PAID, delayed=fate is Fate.DELAYED_FAILED)


class _EventIds:
    """Event ids that a seed repeats: `evt_` + the intent + a counter."""

    def __init__(self, rng: random.Random, intent_id: str) -> None:
        self._stem = f"evt_{intent_id.removeprefix('pi_')}_{rng.randrange(16**4):04x}"
        self._n = 0

    def next(self) -> str:
        self._n += 1
        return f"{self._stem}{self._n:02d}"


def _at(evt: dict[str, Any], created: int) -> dict[str, Any]:
    evt["created"] = created
    return evt


def _with_id(evt: dict[str, Any], event_id: str) -> dict[str, Any]:
    evt["id"] = event_id
    return evt


def _canceled(evt: dict[str, Any], reason: str) -> dict[str, Any]:
    evt["data"]["object"]["cancellation_reason"] = reason
    evt["data"]["object"]["canceled_at"] = evt["created"]
    return evt


async def seed_scenario(conn: asyncpg.Connection, scenario: Scenario) -> None:
    """Load the scenario's stock and carts with COPY."""
    await _seed(conn, scenario.stock, scenario.carts)

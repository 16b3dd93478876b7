"""A reference model of the payment lifecycle (issue 7), the second implementation.

Written from the lifecycle rules alone (issue 7's spec: facts per intent, the
order, first paid first served; README "The life of a payment"), never from the
consumer's code, and importing nothing from `consumer/` or `schemas/`: it reads
Stripe's events as the plain JSON dicts Stripe sends. The property tests run
the real consumer against the real database and compare the outcome with what
this model predicts, so a misreading has to be made twice, independently, to
go unnoticed.

Every fact about an intent is a function of the SET of its events: the model
takes them in any order, duplicates included, and never looks at delivery
order. Allocation of scarce stock between intents is the one exception: it
depends on which batch each authorization lands in. `one_batch` predicts it
for a single batch from `created` alone; `in_batches` for any sequence of
batches, given where each copy of an event arrived. So does which of two
payments for one cart is its order and which the `duplicate` (issue 17: one
live order per cart, the first decided wins). An intent whose authorizations
name no cart is not the shop's: it has no order (issue 17, `not_an_order`).
`money_owed` says which Stripe action each order that cannot be filled is owed
at the end: a cancel while its money is held, a refund once it is captured.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

Event = Mapping[str, Any]

# Status tiers: within tier 0 Stripe's machine cycles (a failure after 3-D Secure
# goes back to requires_payment_method, later in time), so `created` decides there.
TIER: dict[str, int] = {
    "requires_payment_method": 0,
    "requires_confirmation": 0,
    "requires_action": 0,
    "processing": 0,
    "requires_capture": 1,
    "succeeded": 2,
    "canceled": 3,
}
# Same-second tie-break between events of one intent, from the event type.
STEP: dict[str, int] = {
    "payment_intent.created": 0,
    "payment_intent.requires_action": 1,
    "payment_intent.partially_funded": 1,
    "payment_intent.processing": 2,
    "payment_intent.payment_failed": 3,
    "payment_intent.amount_capturable_updated": 4,
    "payment_intent.authorized": 4,
    "payment_intent.succeeded": 5,
    "payment_intent.canceled": 7,
    "charge.expired": 6,
}
AUTHORIZATION_TYPES = frozenset(
    {
        "payment_intent.amount_capturable_updated",
        "payment_intent.authorized",
        "payment_intent.succeeded",
    }
)
REFUND_RANK = {"pending": 0, "requires_action": 0, "succeeded": 1, "failed": 2, "canceled": 2}
REFUND_COUNTS = frozenset({"pending", "requires_action", "succeeded"})
DISPUTE_RANK = {
    "warning_needs_response": 0,
    "needs_response": 0,
    "warning_under_review": 1,
    "under_review": 1,
    "won": 2,
    "lost": 2,
    "warning_closed": 2,
    "prevented": 2,
    "charge_refunded": 2,
}
DISPUTE_NOT_AGAINST_US = frozenset({"won", "warning_closed", "prevented", "charge_refunded"})
# The metadata key that names the shop's cart (CART_METADATA_KEY's default). An
# intent whose authorizations name none is not the shop's: no order, no action.
CART_KEY = "cart_id"
# Allocations whose order holds its cart while not canceled: one per cart.
LIVE = frozenset({"placed", "needs_review"})
# Allocations whose money goes back: canceled while held, refunded once captured.
UNFILLABLE = frozenset({"out_of_stock", "duplicate"})


def _object(event: Event) -> Mapping[str, Any]:
    obj: Mapping[str, Any] = event["data"]["object"]
    return obj


def intent_of(event: Event) -> str | None:
    """The payment intent an event concerns: the object itself, or the one it names."""
    obj = _object(event)
    if obj.get("object") == "payment_intent":
        return str(obj["id"])
    if obj.get("object") in ("charge", "dispute", "refund"):
        intent = obj.get("payment_intent")
        return str(intent) if intent else None
    return None


@dataclass(frozen=True)
class Authorization:
    """What the order is created from: the intent's first authorization event."""

    event_id: str
    created: int
    step: int
    cart_id: str | None
    amount: int
    currency: str
    amount_authorized: int


@dataclass(frozen=True)
class RefundFact:
    amount: int
    status: str
    status_created: int


@dataclass(frozen=True)
class DisputeFact:
    id: str
    status: str
    amount: int
    reason: str
    created: int

    @property
    def against_us(self) -> bool:
        return self.status not in DISPUTE_NOT_AGAINST_US


@dataclass(frozen=True)
class Intent:
    """The facts kept per intent (rules 1-4)."""

    status: str | None = None
    status_created: int | None = None
    status_step: int | None = None
    status_event_id: str | None = None
    cancellation_reason: str | None = None
    authorization: Authorization | None = None
    charge_amount_refunded: int = 0
    charge_refunded: bool = False
    refunds: Mapping[str, RefundFact] = field(default_factory=dict)
    dispute: DisputeFact | None = None
    amount_received: int = 0  # the most Stripe said it captured
    capture_before: int | None = None  # the latest deadline of an uncaptured authorization

    @property
    def canceled(self) -> bool:
        return self.status == "canceled"

    @property
    def amount_refunded(self) -> int:
        counted = sum(r.amount for r in self.refunds.values() if r.status in REFUND_COUNTS)
        return max(self.charge_amount_refunded, counted)

    def refunded_in_full(self, order_amount: int) -> bool:
        return self.charge_refunded or self.amount_refunded >= order_amount

    @property
    def disputed(self) -> bool:
        return self.dispute is not None and self.dispute.against_us


def _status_of(event: Event) -> tuple[str, str | None] | None:
    """(status, cancellation_reason) when `event` carries a status, else None."""
    kind = event["type"]
    if kind == "charge.expired":
        return ("canceled", "expired")
    obj = _object(event)
    if (
        kind.startswith("payment_intent.")
        and kind in STEP
        and obj.get("object") == "payment_intent"
        and obj.get("status") in TIER
    ):
        return (obj["status"], obj.get("cancellation_reason"))
    return None


def _authorization(event: Event) -> Authorization | None:
    obj = _object(event)
    if event["type"] not in AUTHORIZATION_TYPES or obj.get("object") != "payment_intent":
        return None
    status = obj.get("status")
    if status == "requires_capture":
        authorized = obj.get("amount_capturable") or 0
    elif status == "succeeded":
        authorized = obj.get("amount_received") or 0
    else:
        return None
    return Authorization(
        event_id=event["id"],
        created=event["created"],
        step=STEP[event["type"]],
        cart_id=(obj.get("metadata") or {}).get(CART_KEY) or None,
        amount=obj["amount"],
        currency=str(obj["currency"]).lower(),
        amount_authorized=authorized,
    )


def intent_facts(events: Iterable[Event]) -> Intent:
    """The facts of one intent from its events, in any order, duplicates included.

    Its order (if any) comes from the earliest authorization that names a cart.
    """
    unique = {e["id"]: e for e in events}
    status_key: tuple[int, int, int, str] | None = None
    status: tuple[str, str | None] | None = None
    first_auth: Authorization | None = None
    charge_refunded_max, charge_refunded = 0, False
    received = 0
    deadline: int | None = None
    refunds: dict[str, tuple[tuple[int, int], RefundFact]] = {}
    dispute_key: tuple[int, int, str] | None = None
    dispute: DisputeFact | None = None
    for event in unique.values():
        obj = _object(event)
        carried = _status_of(event)
        if carried is not None:
            key = (TIER[carried[0]], event["created"], STEP[event["type"]], event["id"])
            if status_key is None or key > status_key:
                status_key, status = key, carried
            if obj.get("object") == "payment_intent":
                received = max(received, obj.get("amount_received") or 0)
        auth = _authorization(event)
        if (
            auth is not None
            and auth.cart_id is not None
            and (first_auth is None or _first(auth) < _first(first_auth))
        ):
            first_auth = auth
        kind = obj.get("object")
        if event["type"].startswith("charge.") and kind == "charge":
            deadline = _later(deadline, _capture_before(obj))
        # An uncaptured charge (expired, canceled) reports the hold it released as
        # refunded: that is no money sent back, so only captured charges count.
        if event["type"].startswith("charge.") and kind == "charge" and obj.get("captured", True):
            charge_refunded_max = max(charge_refunded_max, obj.get("amount_refunded") or 0)
            charge_refunded = charge_refunded or bool(obj.get("refunded"))
            received = max(received, obj.get("amount_captured") or 0)
        elif kind == "refund":
            rkey = (event["created"], REFUND_RANK.get(obj.get("status", ""), 0))
            known = refunds.get(obj["id"])
            if known is None or rkey > known[0]:
                refunds[obj["id"]] = (
                    rkey,
                    RefundFact(obj.get("amount") or 0, obj.get("status", ""), event["created"]),
                )
        elif event["type"].startswith("charge.dispute.") and kind == "dispute":
            dkey = (event["created"], DISPUTE_RANK.get(obj.get("status", ""), 0), obj["id"])
            if dispute_key is None or dkey > dispute_key:
                dispute_key = dkey
                dispute = DisputeFact(
                    obj["id"],
                    obj.get("status", ""),
                    obj.get("amount") or 0,
                    obj.get("reason", ""),
                    event["created"],
                )
    return Intent(
        status=status[0] if status else None,
        status_created=status_key[1] if status_key else None,
        status_step=status_key[2] if status_key else None,
        status_event_id=status_key[3] if status_key else None,
        cancellation_reason=status[1] if status and status[0] == "canceled" else None,
        authorization=first_auth,
        charge_amount_refunded=charge_refunded_max,
        charge_refunded=charge_refunded,
        refunds={rid: fact for rid, (_, fact) in refunds.items()},
        dispute=dispute,
        amount_received=received,
        capture_before=deadline,
    )


def _capture_before(charge: Mapping[str, Any]) -> int | None:
    card = (charge.get("payment_method_details") or {}).get("card") or {}
    deadline = card.get("capture_before")
    return int(deadline) if deadline is not None else None


def _later(a: int | None, b: int | None) -> int | None:
    return b if a is None else a if b is None else max(a, b)


def _first(auth: Authorization) -> tuple[int, int, str]:
    """Which authorization came first: by `created`, then as the status key breaks ties."""
    return (auth.created, auth.step, auth.event_id)


def intents(events: Iterable[Event]) -> dict[str, Intent]:
    """Every intent's facts; events that name no intent change nothing."""
    grouped: dict[str, list[Event]] = {}
    for event in events:
        intent = intent_of(event)
        if intent is not None:
            grouped.setdefault(intent, []).append(event)
    return {pid: intent_facts(evs) for pid, evs in grouped.items()}


@dataclass(frozen=True)
class Cart:
    currency: str
    lines: tuple[tuple[str, int, int], ...]  # (sku, quantity, unit_amount)

    @property
    def total(self) -> int:
        return sum(qty * unit for _, qty, unit in self.lines)

    @property
    def demand(self) -> Counter[str]:
        """Quantity per SKU, lines of one SKU summed (one demand)."""
        wanted: Counter[str] = Counter()
        for sku, qty, _ in self.lines:
            wanted[sku] += qty
        return wanted


def review_reason(auth: Authorization, carts: Mapping[str, Cart]) -> str | None:
    """Why the order needs review, checked in the spec's order; None when it may take stock."""
    assert auth.cart_id is not None  # an intent that names no cart has no order to review
    cart = carts.get(auth.cart_id)
    if cart is None:
        return "cart_missing"
    if not cart.lines:
        return "cart_empty"
    if cart.currency.lower() != auth.currency:
        return "currency_mismatch"
    if cart.total != auth.amount:
        return "amount_mismatch"
    if auth.amount_authorized < cart.total:
        return "authorization_short"
    return None


def order_status(intent: Intent, allocation: str) -> str:
    """The order's status: first match of canceled, disputed, refunded, the allocation."""
    assert intent.authorization is not None
    if intent.canceled:
        return "canceled"
    if intent.dispute is not None and intent.dispute.against_us:
        return "disputed"
    if intent.refunded_in_full(intent.authorization.amount):
        return "refunded"
    return allocation


@dataclass(frozen=True)
class Order:
    """An order row as the model predicts it; `status_reason` only where the spec fixes it."""

    status: str
    allocation: str
    status_reason: str | None
    cart_id: str | None
    amount: int
    currency: str
    amount_authorized: int
    amount_refunded: int
    cancellation_reason: str | None
    dispute_status: str | None
    dispute_amount: int | None
    dispute_reason: str | None
    amount_captured: int
    capture_before: int | None


REASONED = frozenset({"needs_review", "out_of_stock", "duplicate"})


def order(intent: Intent, allocation: str, status_reason: str | None) -> Order:
    """The order of `intent` once its allocation is known."""
    auth = intent.authorization
    assert auth is not None
    dispute = intent.dispute
    return Order(
        status=order_status(intent, allocation),
        allocation=allocation,
        status_reason=status_reason if allocation in REASONED else None,
        cart_id=auth.cart_id,
        amount=auth.amount,
        currency=auth.currency,
        amount_authorized=auth.amount_authorized,
        amount_refunded=intent.amount_refunded,
        cancellation_reason=intent.cancellation_reason,
        dispute_status=dispute.status if dispute else None,
        dispute_amount=dispute.amount if dispute else None,
        dispute_reason=dispute.reason if dispute else None,
        amount_captured=intent.amount_received,
        capture_before=intent.capture_before,
    )


def short_reason(short_skus: Iterable[str]) -> str:
    return "short:" + ",".join(sorted(short_skus))


def levels_after(
    stock: Mapping[str, int], orders: Mapping[str, Order], carts: Mapping[str, Cart]
) -> dict[str, int]:
    """Stock left: what placed orders took, given back by those canceled since."""
    left = dict(stock)
    for placed in orders.values():
        if placed.allocation == "placed" and placed.status != "canceled":
            assert placed.cart_id is not None
            for sku, qty in carts[placed.cart_id].demand.items():
                left[sku] = left.get(sku, 0) - qty
    return left


@dataclass(frozen=True)
class State:
    intents: dict[str, Intent]
    orders: dict[str, Order]
    levels: dict[str, int]


# Per new order: (allocation, status_reason).
Verdict = tuple[str, str | None]


def one_batch(
    events: Iterable[Event], carts: Mapping[str, Cart], stock: Mapping[str, int]
) -> State:
    """The state after applying every event in ONE batch to an empty database.

    New orders are decided in the order of their first authorization's `created`;
    the caller guarantees no two intents share that second (the real tie-breaks,
    received-at, partition and offset, are delivery facts this function has not).
    """
    facts = intents(events)
    decided: dict[str, Verdict] = {}
    competing: list[tuple[tuple[int, ...], str]] = []
    for pid, intent in facts.items():
        if intent.authorization is None:
            continue  # never authorized, or not the shop's (no cart): no order
        if intent.canceled:
            decided[pid] = ("skipped", None)
        else:
            competing.append(((intent.authorization.created,), pid))
    seconds = [paid for paid, _ in competing]
    assert len(set(seconds)) == len(seconds), "authorizations of two intents share a second"
    left = dict(stock)
    decided.update(_decide_new(competing, facts, carts, left, {}))
    orders = {pid: order(facts[pid], *verdict) for pid, verdict in decided.items()}
    return State(facts, orders, left)


# Where a copy of an event arrived: (received-at ms, partition, offset).
Arrival = tuple[int, int, int]


def in_batches(
    batches: Iterable[Sequence[tuple[Event, Arrival]]],
    carts: Mapping[str, Cart],
    stock: Mapping[str, int],
) -> State:
    """The state after applying `batches` one after the other, each its own transaction.

    An event applies in the batch of its first copy (later copies change
    nothing) and is paid at that copy's arrival. Per batch: stock given back by
    orders canceled in it is there first for the batch's new orders ("goes to
    the next order that asks"), and so is a cart whose live order was canceled
    in it; the new orders are created `skipped` if their intent ends the batch
    canceled, else decided in the order of their authorization (created,
    received-at, partition, offset); an `out_of_stock` order is never revisited,
    and a `duplicate` stays one.
    """
    applied: dict[str, Event] = {}
    decided: dict[str, Verdict] = {}
    facts: dict[str, Intent] = {}
    left = dict(stock)
    for batch in batches:
        arrived: dict[str, Arrival] = {}
        for event, arrival in batch:
            if event["id"] not in applied and event["id"] not in arrived:
                arrived[event["id"]] = arrival
        before = facts
        applied.update((e["id"], e) for e, _ in batch if e["id"] in arrived)
        facts = intents(applied.values())
        for pid, (allocation, _) in decided.items():
            if allocation == "placed" and facts[pid].canceled and not before[pid].canceled:
                for sku, qty in _demand(facts[pid], carts).items():
                    left[sku] = left.get(sku, 0) + qty
        holders = {
            _cart_of(facts[pid]): pid
            for pid, (allocation, _) in decided.items()
            if allocation in LIVE and not facts[pid].canceled
        }
        competing: list[tuple[tuple[int, ...], str]] = []
        for pid, intent in facts.items():
            if pid in decided or intent.authorization is None:
                continue
            if intent.canceled:
                decided[pid] = ("skipped", None)
                continue
            paid = min(
                (applied[eid]["created"], *arrival)
                for eid, arrival in arrived.items()
                if intent_of(applied[eid]) == pid and _names_a_cart(applied[eid])
            )
            competing.append((paid, pid))
        decided.update(_decide_new(competing, facts, carts, left, holders))
    orders = {pid: order(facts[pid], *verdict) for pid, verdict in decided.items()}
    return State(facts, orders, left)


def _names_a_cart(event: Event) -> bool:
    auth = _authorization(event)
    return auth is not None and auth.cart_id is not None


def _cart_of(intent: Intent) -> str:
    assert intent.authorization is not None and intent.authorization.cart_id is not None
    return intent.authorization.cart_id


def _demand(intent: Intent, carts: Mapping[str, Cart]) -> Counter[str]:
    return carts[_cart_of(intent)].demand


def _decide_new(
    competing: list[tuple[tuple[int, ...], str]],
    facts: Mapping[str, Intent],
    carts: Mapping[str, Cart],
    left: dict[str, int],
    holders: dict[str, str],
) -> dict[str, Verdict]:
    """First paid, first decided: a cart already held makes a duplicate; else its cart
    is checked (needs_review), then it takes its whole demand from `left` or nothing.
    A needs_review or placed order holds its cart for the orders after it."""
    decided: dict[str, Verdict] = {}
    for _, pid in sorted(competing):
        auth = facts[pid].authorization
        assert auth is not None and auth.cart_id is not None
        holder = holders.get(auth.cart_id)
        if holder is not None:
            decided[pid] = ("duplicate", f"duplicate_of:{holder}")
            continue
        reason = review_reason(auth, carts)
        if reason is not None:
            decided[pid] = ("needs_review", reason)
            holders[auth.cart_id] = pid
            continue
        demand = _demand(facts[pid], carts)
        short = [sku for sku, qty in demand.items() if left.get(sku, 0) < qty]
        if short:
            decided[pid] = ("out_of_stock", short_reason(short))
            continue
        for sku, qty in demand.items():
            left[sku] = left.get(sku, 0) - qty
        decided[pid] = ("placed", None)
        holders[auth.cart_id] = pid
    return decided


def money_owed(state: State) -> dict[str, str]:
    """The Stripe action each order that cannot be filled is owed at the end: a cancel
    while its money is held, a refund while captured money is not all refunded (unless
    a dispute holds it). Its outbox row must exist, whatever the delivery."""
    owed: dict[str, str] = {}
    for pid, placed in state.orders.items():
        intent = state.intents[pid]
        if placed.allocation not in UNFILLABLE:
            continue
        if intent.status == "requires_capture":
            owed[pid] = "cancel_payment_intent"
        elif (
            intent.status == "succeeded"
            and intent.amount_received > intent.amount_refunded
            and not intent.disputed
        ):
            owed[pid] = "refund_payment_intent"
    return owed

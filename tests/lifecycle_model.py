"""A reference model of the payment lifecycle (issue 7), the second implementation.

Written from the lifecycle rules alone (issue 7's spec: facts per intent, the
order, first paid first served; README "The life of a payment"), never from the
consumer's code, and importing nothing from `consumer/` or `schemas/`: it reads
Stripe's events as the plain JSON dicts Stripe sends. The property tests run
the real consumer against the real database and compare the outcome with what
this model predicts, so a misreading has to be made twice, independently, to
go unnoticed.

Issue 18: an order's terms join the intent and its Checkout Session (the cart
from the intent's metadata, else the session's; the cart checked against the
session's subtotal); the authorization is the latest (an increment moves it);
a needs_review order whose terms change is decided again; refunds count from
what Stripe says now (a failed refund stops counting; the released rest of a
partial capture is no refund).

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
REFUND_STOPPED = frozenset({"failed", "canceled"})
# An appeal (API 2026-10-28) comes after a lost dispute and before its final word.
DISPUTE_RANK = {
    "warning_needs_response": 0,
    "needs_response": 0,
    "warning_under_review": 1,
    "under_review": 1,
    "lost": 2,
    "appeal_needs_response": 3,
    "appeal_under_review": 4,
    "won": 5,
    "warning_closed": 5,
    "prevented": 5,
    "charge_refunded": 5,
}
# A captured charge's snapshots within one second: captured, refunded, then any update.
CHARGE_STEP = {"charge.succeeded": 0, "charge.captured": 1, "charge.refunded": 2}
CHECKOUT_STEP = {
    "checkout.session.completed": 0,
    "checkout.session.async_payment_succeeded": 1,
    "checkout.session.async_payment_failed": 1,
    "checkout.session.expired": 1,
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
    if obj.get("object") in ("charge", "dispute", "refund", "checkout.session"):
        intent = obj.get("payment_intent")
        return str(intent) if intent else None
    return None


Key = tuple[int, int, str]


def _key(event: Event, step: int) -> Key:
    return (event["created"], step, event["id"])


@dataclass(frozen=True)
class Authorization:
    """The intent's latest hold, else its latest capture: what it asks and what is held."""

    key: Key
    amount: int
    currency: str
    held: int
    captured: bool

    @property
    def rank(self) -> tuple[bool, Key]:
        return (not self.captured, self.key)


@dataclass(frozen=True)
class Session:
    """The Checkout Session that made the intent, at its latest snapshot."""

    key: Key
    cart_id: str | None
    subtotal: int | None  # in `currency`, the shop's
    currency: str | None
    total: int | None  # in `total_currency`, the buyer's
    total_currency: str | None
    shipping: int
    discount: int
    tax: int
    paid: bool


@dataclass(frozen=True)
class RefundFact:
    amount: int
    status: str
    status_created: int
    opened: int


# A chargeback open or lost has taken its amount back; an inquiry (warning_*) nothing.
DISPUTE_WITHDRAWN = frozenset(
    {"needs_response", "under_review", "lost", "appeal_needs_response", "appeal_under_review"}
)
DISPUTE_OVER = frozenset({"won", "lost", "warning_closed", "prevented", "charge_refunded"})


@dataclass(frozen=True)
class DisputeFact:
    id: str
    status: str
    amount: int
    reason: str
    created: int
    refundable: bool = False

    @property
    def against_us(self) -> bool:
        return self.status not in DISPUTE_NOT_AGAINST_US


@dataclass(frozen=True)
class Terms:
    cart_id: str
    amount: int
    currency: str
    authorized: int
    cart_amount: int
    cart_currency: str
    shipping: int = 0
    discount: int = 0
    tax: int = 0


@dataclass(frozen=True)
class Intent:
    """The facts kept per intent."""

    status: str | None = None
    status_created: int | None = None
    status_step: int | None = None
    status_event_id: str | None = None
    cancellation_reason: str | None = None
    authorization: Authorization | None = None
    paid_at: int | None = None
    named_cart: tuple[Key, str] | None = None
    session: Session | None = None
    charge: tuple[Key, int, bool] | None = None  # key, refunded (net), refunded in full
    refunds: Mapping[str, RefundFact] = field(default_factory=dict)
    dispute: DisputeFact | None = None
    amount_received: int = 0  # the most Stripe said it captured
    capture_before: int | None = None  # the latest deadline of an uncaptured authorization
    released: int = 0  # the rest of a partial capture Stripe released as a refund (pre-basil)

    @property
    def canceled(self) -> bool:
        return self.status == "canceled"

    @property
    def stopped_since_charge(self) -> int:
        """Refunds made before the charge last spoke that failed or were canceled after."""
        if self.charge is None:
            return 0
        said_at = self.charge[0][0]
        return sum(
            r.amount
            for r in self.refunds.values()
            if r.status in REFUND_STOPPED and r.opened <= said_at < r.status_created
        )

    @property
    def amount_refunded(self) -> int:
        counted = sum(r.amount for r in self.refunds.values() if r.status in REFUND_COUNTS)
        by_charge = 0 if self.charge is None else max(self.charge[1] - self.stopped_since_charge, 0)
        # Never more than was captured: a released hold is no money back.
        return max(min(max(by_charge, counted - self.released), self.amount_received), 0)

    def refunded_in_full(self, order_amount: int) -> bool:
        if self.charge is not None and self.charge[2] and self.stopped_since_charge == 0:
            return True
        target = self.amount_received or order_amount
        return 0 < target <= self.amount_refunded

    @property
    def disputed(self) -> bool:
        return self.dispute is not None and self.dispute.against_us

    @property
    def cart_id(self) -> str | None:
        if self.named_cart is not None:
            return self.named_cart[1]
        return self.session.cart_id if self.session is not None else None

    @property
    def paid(self) -> bool:
        return self.authorization is not None or (
            self.session is not None and self.session.paid and self.session.total is not None
        )

    @property
    def terms(self) -> Terms | None:
        """What the order is decided on; None while it cannot be made."""
        cart_id = self.cart_id
        if cart_id is None or not self.paid:
            return None
        auth, session = self.authorization, self.session
        if auth is not None:
            amount, currency, held = auth.amount, auth.currency, auth.held
        else:
            assert session is not None and session.total is not None
            amount, currency, held = session.total, session.total_currency or "", session.total
        if session is not None and session.subtotal is not None:
            return Terms(
                cart_id,
                amount,
                currency,
                held,
                session.subtotal,
                session.currency or currency,
                session.shipping,
                session.discount,
                session.tax,
            )
        return Terms(cart_id, amount, currency, held, amount, currency)


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
        held = obj.get("amount_capturable") or 0
    elif status == "succeeded":
        held = obj.get("amount_received") or 0
    else:
        return None
    key = _key(event, STEP[event["type"]])
    return Authorization(
        key, obj["amount"], str(obj["currency"]).lower(), held, status == "succeeded"
    )


def _session(event: Event) -> Session | None:
    obj = _object(event)
    if (
        event["type"] not in CHECKOUT_STEP
        or obj.get("object") != "checkout.session"
        or obj.get("mode", "payment") != "payment"
    ):
        return None
    conversion = obj.get("currency_conversion")
    details = obj.get("total_details") or {}
    subtotal = conversion["amount_subtotal"] if conversion else obj.get("amount_subtotal")
    currency = conversion["source_currency"] if conversion else obj.get("currency")
    return Session(
        _key(event, CHECKOUT_STEP[event["type"]]),
        (obj.get("metadata") or {}).get(CART_KEY) or obj.get("client_reference_id") or None,
        subtotal,
        currency.lower() if currency else None,
        obj.get("amount_total"),
        obj["currency"].lower() if obj.get("currency") else None,
        details.get("amount_shipping") or 0,
        details.get("amount_discount") or 0,
        details.get("amount_tax") or 0,
        obj.get("payment_status") == "paid",
    )


def _named(naming: list[tuple[bool, Key, str]]) -> tuple[Key, str] | None:
    """The cart named by the earliest authorization that names one (what the buyer paid
    for), else by the latest snapshot that names one."""
    held = sorted((key, cart) for is_held, key, cart in naming if is_held)
    if held:
        return held[0]
    return max(((key, cart) for _, key, cart in naming), default=None)


def _authorizes(event: Event) -> bool:
    """An authorization or capture, or a paid Checkout Session."""
    if _authorization(event) is not None:
        return True
    session = _session(event)
    return session is not None and session.paid and session.total is not None


def _before_basil(event: Event) -> bool:
    """Stripe rendered it before API 2025-03-31.basil, when a partial capture's released
    rest was a refund object, counted in the charge's amount_refunded."""
    version = event.get("api_version")
    return version is None or version < "2025-03-31"


def _released(event: Event) -> int:
    """What a pre-basil captured charge says Stripe released of a partial capture (the
    charge's amount is what was held), as a refund."""
    if not _before_basil(event) or _captured_charge(event) is None:
        return 0
    obj = _object(event)
    amount, got = obj.get("amount") or 0, obj.get("amount_captured") or 0
    return amount - got if 0 < got < amount else 0


def _captured_charge(event: Event) -> tuple[Key, int, bool, int] | None:
    """A captured charge's snapshot: (key, money refunded, refunded in full, captured)."""
    obj = _object(event)
    kind = event["type"]
    if (
        not kind.startswith("charge.")
        or kind.startswith("charge.dispute.")
        or obj.get("object") != "charge"
        or not obj.get("captured", True)
    ):
        return None
    amount, captured = obj.get("amount") or 0, obj.get("amount_captured") or 0
    released = amount - captured if 0 < captured < amount and _before_basil(event) else 0
    refunded = max((obj.get("amount_refunded") or 0) - released, 0)
    return (_key(event, CHARGE_STEP.get(kind, 3)), refunded, bool(obj.get("refunded")), captured)


def intent_facts(events: Iterable[Event]) -> Intent:  # noqa: C901 - one pass, one rule each
    """The facts of one intent from its events, in any order, duplicates included."""
    unique = {e["id"]: e for e in events}
    status_key: tuple[int, int, int, str] | None = None
    status: tuple[str, str | None] | None = None
    auth: Authorization | None = None
    paid_at: int | None = None
    # Every snapshot of the intent that names a cart: (held the money, key, cart).
    naming: list[tuple[bool, Key, str]] = []
    session: Session | None = None
    charge: tuple[Key, int, bool] | None = None
    received = 0
    released = 0
    deadline: int | None = None
    refunds: dict[str, tuple[tuple[int, int, int, int], RefundFact]] = {}
    dispute_key: tuple[int, int, str] | None = None
    dispute: DisputeFact | None = None
    for event in unique.values():
        obj = _object(event)
        kind = obj.get("object")
        released = max(released, _released(event))
        carried = _status_of(event)
        if carried is not None:
            key = (TIER[carried[0]], event["created"], STEP[event["type"]], event["id"])
            if status_key is None or key > status_key:
                status_key, status = key, carried
            if kind == "payment_intent":
                received = max(received, obj.get("amount_received") or 0)
                cart = (obj.get("metadata") or {}).get(CART_KEY)
                if cart:
                    naming.append((_authorization(event) is not None, key[1:], cart))
        found = _authorization(event)
        if found is not None and (auth is None or found.rank > auth.rank):
            auth = found
        if _authorizes(event):
            paid_at = event["created"] if paid_at is None else min(paid_at, event["created"])
        snapshot = _session(event)
        if snapshot is not None and (session is None or snapshot.key > session.key):
            session = snapshot
        if event["type"].startswith("charge.") and kind == "charge":
            deadline = _later(deadline, _capture_before(obj))
        said = _captured_charge(event)
        if said is not None:
            received = max(received, said[3])
            if charge is None or said[0] > charge[0]:
                charge = said[:3]
        if kind == "refund":
            status_name = obj.get("status", "")
            opened = obj.get("created", event["created"])
            amount = obj.get("amount") or 0
            rkey = (event["created"], REFUND_RANK.get(status_name, 0), amount, opened)
            known = refunds.get(obj["id"])
            if (known is None or rkey > known[0]) and status_name in REFUND_RANK:
                refunds[obj["id"]] = (
                    rkey,
                    RefundFact(amount, status_name, event["created"], opened),
                )
        elif event["type"].startswith("charge.dispute.") and kind == "dispute":
            if obj.get("status", "") not in DISPUTE_RANK:
                continue
            dkey = (event["created"], DISPUTE_RANK[obj["status"]], obj["id"])
            if dispute_key is None or dkey > dispute_key:
                dispute_key = dkey
                dispute = DisputeFact(
                    obj["id"],
                    obj["status"],
                    obj.get("amount") or 0,
                    obj.get("reason", ""),
                    event["created"],
                    bool(obj.get("is_charge_refundable")),
                )
    return Intent(
        status=status[0] if status else None,
        status_created=status_key[1] if status_key else None,
        status_step=status_key[2] if status_key else None,
        status_event_id=status_key[3] if status_key else None,
        cancellation_reason=status[1] if status and status[0] == "canceled" else None,
        authorization=auth,
        paid_at=paid_at,
        named_cart=_named(naming),
        session=session,
        charge=charge,
        refunds={rid: fact for rid, (_, fact) in refunds.items()},
        dispute=dispute,
        amount_received=received,
        capture_before=deadline,
        released=released,
    )


def _capture_before(charge: Mapping[str, Any]) -> int | None:
    card = (charge.get("payment_method_details") or {}).get("card") or {}
    deadline = card.get("capture_before")
    return int(deadline) if deadline is not None else None


def _later(a: int | None, b: int | None) -> int | None:
    return b if a is None else a if b is None else max(a, b)


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


def review_reason(terms: Terms, carts: Mapping[str, Cart]) -> str | None:
    """Why the order needs review, checked in the spec's order; None when it may take stock."""
    cart = carts.get(terms.cart_id)
    if cart is None:
        return "cart_missing"
    if not cart.lines:
        return "cart_empty"
    if cart.currency.lower() != terms.cart_currency:
        return "currency_mismatch"
    if cart.total != terms.cart_amount:
        return "amount_mismatch"
    if terms.authorized < terms.amount:
        return "authorization_short"
    return None


def order_status(intent: Intent, allocation: str) -> str:
    """The order's status: first match of canceled, disputed, refunded, the allocation."""
    terms = intent.terms
    assert terms is not None
    if intent.canceled or allocation == "skipped":
        return "canceled"
    if intent.disputed:
        return "disputed"
    if intent.refunded_in_full(terms.amount):
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
    amount_subtotal: int
    amount_shipping: int
    amount_discount: int
    amount_tax: int


REASONED = frozenset({"needs_review", "out_of_stock", "duplicate"})


def order(intent: Intent, allocation: str, status_reason: str | None) -> Order:
    """The order of `intent` once its allocation is known."""
    terms = intent.terms
    assert terms is not None
    dispute = intent.dispute
    return Order(
        status=order_status(intent, allocation),
        allocation=allocation,
        status_reason=status_reason if allocation in REASONED else None,
        cart_id=terms.cart_id,
        amount=terms.amount,
        currency=terms.currency,
        amount_authorized=terms.authorized,
        amount_refunded=intent.amount_refunded,
        cancellation_reason=intent.cancellation_reason,
        dispute_status=dispute.status if dispute else None,
        dispute_amount=dispute.amount if dispute else None,
        dispute_reason=dispute.reason if dispute else None,
        amount_captured=intent.amount_received,
        capture_before=intent.capture_before,
        amount_subtotal=terms.cart_amount,
        amount_shipping=terms.shipping,
        amount_discount=terms.discount,
        amount_tax=terms.tax,
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


# Per order: (allocation, status_reason).
Verdict = tuple[str, str | None]


def one_batch(
    events: Iterable[Event], carts: Mapping[str, Cart], stock: Mapping[str, int]
) -> State:
    """The state after applying every event in ONE batch to an empty database.

    New orders are decided in the order their money was first held or received
    (`paid_at`); the caller guarantees no two intents share that second (the real
    tie-breaks, received-at, partition and offset, are delivery facts this
    function has not).
    """
    facts = intents(events)
    decided: dict[str, Verdict] = {}
    competing: list[tuple[tuple[int, ...], str]] = []
    for pid, intent in facts.items():
        if intent.terms is None:
            continue  # never paid, or not the shop's (no cart): no order
        if intent.canceled:
            decided[pid] = ("skipped", None)
        else:
            assert intent.paid_at is not None
            competing.append(((intent.paid_at,), pid))
    seconds = [paid for paid, _ in competing]
    assert len(set(seconds)) == len(seconds), "two intents were paid in the same second"
    left = dict(stock)
    decided.update(_decide(competing, facts, carts, left, {}))
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
    nothing). Per batch: stock given back by orders canceled in it is there
    first for the batch's decisions ("goes to the next order that asks"), and so
    is a cart whose live order was canceled in it; an intent whose terms became
    known gets its order, created `skipped` if it ends the batch canceled; an
    order in needs_review whose terms changed is decided again; both are
    decided in the order (paid_at, where the batch's earliest authorizing event
    of the intent arrived, else its first event of the batch); an
    `out_of_stock` or `duplicate` order is never revisited.
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
        competing = _competing(facts, before, decided, applied, arrived)
        decided.update(_decide(competing, facts, carts, left, holders))
    orders = {pid: order(facts[pid], *verdict) for pid, verdict in decided.items()}
    return State(facts, orders, left)


def _competing(
    facts: Mapping[str, Intent],
    before: Mapping[str, Intent],
    decided: dict[str, Verdict],
    applied: Mapping[str, Event],
    arrived: Mapping[str, Arrival],
) -> list[tuple[tuple[int, ...], str]]:
    """The orders the batch decides, with what they are served by (`in_batches`); records
    `skipped` the new orders of intents the batch ends canceled."""
    competing: list[tuple[tuple[int, ...], str]] = []
    for pid, intent in facts.items():
        terms = intent.terms
        if terms is None or (intent.canceled and pid in decided):
            continue
        if pid in decided:
            was = before.get(pid)
            if decided[pid][0] != "needs_review" or (was is not None and was.terms == terms):
                continue
        elif intent.canceled:
            decided[pid] = ("skipped", None)
            continue
        mine = [eid for eid in arrived if intent_of(applied[eid]) == pid]
        if not mine:
            continue
        paying = [(applied[e]["created"], arrived[e]) for e in mine if _authorizes(applied[e])]
        where = min(paying)[1] if paying else min(arrived[e] for e in mine)
        assert intent.paid_at is not None
        competing.append(((intent.paid_at, *where), pid))
    return competing


def _cart_of(intent: Intent) -> str:
    terms = intent.terms
    assert terms is not None
    return terms.cart_id


def _demand(intent: Intent, carts: Mapping[str, Cart]) -> Counter[str]:
    return carts[_cart_of(intent)].demand


def _decide(
    competing: list[tuple[tuple[int, ...], str]],
    facts: Mapping[str, Intent],
    carts: Mapping[str, Cart],
    left: dict[str, int],
    holders: dict[str, str],
) -> dict[str, Verdict]:
    """First paid, first decided: a cart another order holds makes a duplicate; else its
    cart is checked (needs_review), then it takes its whole demand from `left` or nothing.
    A needs_review or placed order holds its cart for the orders after it."""
    decided: dict[str, Verdict] = {}
    for _, pid in sorted(competing):
        terms = facts[pid].terms
        assert terms is not None
        holder = holders.get(terms.cart_id)
        if holder is not None and holder != pid:
            decided[pid] = ("duplicate", f"duplicate_of:{holder}")
            continue
        reason = review_reason(terms, carts)
        if reason is not None:
            decided[pid] = ("needs_review", reason)
            holders[terms.cart_id] = pid
            continue
        demand = carts[terms.cart_id].demand
        short = [sku for sku, qty in demand.items() if left.get(sku, 0) < qty]
        if short:
            decided[pid] = ("out_of_stock", short_reason(short))
            continue
        for sku, qty in demand.items():
            left[sku] = left.get(sku, 0) - qty
        decided[pid] = ("placed", None)
        holders[terms.cart_id] = pid
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
        elif intent.status == "succeeded":
            d = intent.dispute
            taken_back = d.amount if d is not None and d.status in DISPUTE_WITHDRAWN else 0
            blocked = d is not None and d.status not in DISPUTE_OVER and not d.refundable
            if intent.amount_received > intent.amount_refunded + taken_back and not blocked:
                owed[pid] = "refund_payment_intent"
    return owed


def refunds_left_to_a_person(state: State) -> set[str]:
    """The orders owed a refund at the end after a refund of theirs failed or was
    canceled: intentflow does not refund the same payment method again by itself
    (consumer/outbox.py, REFUND_FAILED); each is `reconcile`'s to report."""
    return {
        pid
        for pid, action in money_owed(state).items()
        if action == "refund_payment_intent"
        and any(r.status in REFUND_STOPPED for r in state.intents[pid].refunds.values())
    }


def refund_stopped(state: State) -> set[str]:
    """The intents with a refund that failed or was canceled, at the end."""
    return {
        pid
        for pid, intent in state.intents.items()
        if any(r.status in REFUND_STOPPED for r in intent.refunds.values())
    }

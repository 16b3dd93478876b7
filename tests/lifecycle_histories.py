"""Stripe histories for the lifecycle's property tests: objects, scenarios, deliveries.

hypothesis strategies that draw carts and stock, one plausible Stripe history per
payment intent, and its delivery (copies, one shuffle across intents and
partitions, batch boundaries); used by tests/integration/test_lifecycle_properties.py
and read by the reference model (tests/lifecycle_model.py) as plain dicts.
"""

from __future__ import annotations

import zlib
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from itertools import pairwise
from typing import Any

from hypothesis import strategies as st

from intentflow.consumer.decode import Envelope, decode
from intentflow.schemas import contract_headers, encode_key
from intentflow.stripekit import events
from tests import lifecycle_model as model

PARTITIONS = 3
BASE_S = 1_760_000_000  # event `created` seconds
BASE_MS = BASE_S * 1000  # received-at header
# Seconds between the first authorizations of two intents: distinct, so the model
# needs no tie-break by received-at, yet histories still overlap in time.
SPACING_S = 2
SKUS = ("sku-a", "sku-b", "sku-c")
ABUNDANT = 1000  # more than every cart of an example together can take


# ---------------------------------------------------------------------------
# Stripe-shaped objects (stripekit.events has the payment intent and the event
# envelope; charges, refunds and disputes with explicit amounts are built here).


def charge_id(intent_id: str) -> str:
    return f"ch_{intent_id}"


def intent_object(
    purchase: Purchase,
    status: str,
    *,
    capturable: int = 0,
    received: int = 0,
    cancellation_reason: str | None = None,
    failed: bool = False,
    less: int = 0,
) -> dict[str, Any]:
    """The intent in `status`; `less`: before an increment raised its amount by that."""
    obj = events.payment_intent(
        purchase.intent_id,
        amount=purchase.amount - less,
        currency=purchase.currency,
        status=status,
        cart_id=purchase.intent_cart_id,
        created=BASE_S,  # set to the intent's first event when the history is placed in time
    )
    obj.update(
        amount_capturable=capturable,
        amount_received=received,
        cancellation_reason=cancellation_reason,
        latest_charge=charge_id(purchase.intent_id),
    )
    if failed:
        obj["last_payment_error"] = {
            "code": "card_declined",
            "decline_code": "insufficient_funds",
            "message": "Your card has insufficient funds.",
            "type": "card_error",
        }
    return obj


def charge_object(
    purchase: Purchase,
    *,
    captured: bool,
    amount_refunded: int = 0,
    refunded: bool = False,
    status: str = "succeeded",
    amount_captured: int | None = None,
) -> dict[str, Any]:
    """The intent's one charge. Before API basil (these events' version) a partial capture
    counts its released rest in `amount_refunded`."""
    # An authorization's deadline: Stripe shows it on the charge while it is uncaptured
    # (payment_method_details.card.capture_before, about 7 days for most cards).
    card = {"capture_before": None if captured else BASE_S + 7 * 86_400}
    return {
        "id": charge_id(purchase.intent_id),
        "object": "charge",
        "amount": purchase.authorized,
        "amount_captured": (
            (purchase.authorized if amount_captured is None else amount_captured) if captured else 0
        ),
        "payment_method_details": {"type": "card", "card": card},
        "amount_refunded": amount_refunded,
        "captured": captured,
        "currency": purchase.currency,
        "paid": True,
        "payment_intent": purchase.intent_id,
        "refunded": refunded,
        "status": status,
        "created": BASE_S,
    }


def refund_object(
    purchase: Purchase,
    refund_id: str,
    amount: int,
    status: str,
    *,
    reason: str | None = "requested_by_customer",
) -> dict[str, Any]:
    """A refund; its own `created` (when it was made) is set when the history is placed."""
    return {
        "id": refund_id,
        "object": "refund",
        "amount": amount,
        "charge": charge_id(purchase.intent_id),
        "currency": purchase.currency,
        "payment_intent": purchase.intent_id,
        "reason": reason,
        "status": status,
        "created": BASE_S,
    }


def session_object(purchase: Purchase, payment_status: str) -> dict[str, Any]:
    """The Checkout Session that made the intent: the cart on it, its amounts."""
    cart_on_session = purchase.cart_id if purchase.via_checkout else None
    by_reference = purchase.cart_by_reference
    return {
        "id": f"cs_{purchase.intent_id}",
        "object": "checkout.session",
        "mode": "payment",
        "payment_intent": purchase.intent_id,
        "client_reference_id": cart_on_session if by_reference else None,
        "metadata": {} if by_reference or cart_on_session is None else {"cart_id": cart_on_session},
        "amount_subtotal": purchase.subtotal,
        "amount_total": purchase.amount,
        "currency": purchase.currency,
        "total_details": {
            "amount_discount": purchase.discount,
            "amount_shipping": purchase.shipping,
            "amount_tax": purchase.tax,
        },
        "payment_status": payment_status,
        "status": "complete",
        "created": BASE_S,
    }


def dispute_object(purchase: Purchase, status: str, reason: str) -> dict[str, Any]:
    return {
        "id": f"dp_{purchase.intent_id}",
        "object": "dispute",
        "amount": purchase.authorized,
        "charge": charge_id(purchase.intent_id),
        "currency": purchase.currency,
        "payment_intent": purchase.intent_id,
        "reason": reason,
        "status": status,
        "is_charge_refundable": False,
        "created": BASE_S,
    }


# ---------------------------------------------------------------------------
# Scenarios: carts, stock and one history per intent.

PROBLEMS = (
    "no_cart_id",
    "cart_missing",
    "cart_empty",
    "currency_mismatch",
    "amount_mismatch",
    "authorization_short",
)


@dataclass(frozen=True)
class Terms:
    """What one intent asks and authorizes, and its cart, before it has ids."""

    lines: tuple[tuple[str, int, int], ...]  # the cart's (sku, quantity, unit_amount)
    problem: str | None  # one of PROBLEMS, or None
    amount: int
    authorized: int
    # Paid through Stripe Checkout: the cart rides on the session (its
    # client_reference_id, or its metadata), and on the intent too when the shop copies
    # it there; the cart is checked against the session's subtotal.
    via_checkout: bool = False
    cart_on_intent: bool = True
    cart_by_reference: bool = True
    subtotal: int = 0
    shipping: int = 0
    discount: int = 0
    tax: int = 0
    # The authorization was incremented by this after it was first made.
    increment: int = 0

    @property
    def cart(self) -> model.Cart | None:
        """The cart as stored (None: no such cart)."""
        if self.problem == "cart_missing":
            return None
        if self.problem == "cart_empty":
            return model.Cart("usd", ())
        return model.Cart("eur" if self.problem == "currency_mismatch" else "usd", self.lines)


@st.composite
def terms(draw: st.DrawFn) -> Terms:
    line = st.tuples(st.sampled_from(SKUS), st.integers(1, 3), st.sampled_from([100, 250, 1000]))
    lines = tuple(draw(st.lists(line, min_size=1, max_size=3)))
    # Two carts in three can take stock; the third needs review for one reason or another.
    problem = draw(st.one_of(st.none(), st.none(), st.sampled_from(PROBLEMS)))
    total = model.Cart("usd", lines).total
    # One purchase in three goes through Checkout: shipping and tax on top, a discount off.
    # Never a short authorization: a paid session's intent received its amount_total
    # (a hold for less than asked is a card-present partial authorization).
    via_checkout = draw(st.integers(0, 2)) == 0 and problem != "authorization_short"
    shipping = tax = discount = 0
    if via_checkout:
        shipping = draw(st.sampled_from([0, 500]))
        tax = draw(st.sampled_from([0, 19]))
        discount = draw(st.sampled_from([0, total // 4]))
    subtotal = total
    if problem == "amount_mismatch":
        subtotal = total + draw(st.sampled_from([1, -50]))
    amount = subtotal + shipping + tax - discount
    authorized = amount
    if problem == "authorization_short":
        authorized = amount - draw(st.sampled_from([1, amount // 2]))
    increment = 0
    # The first hold was for less (never for nothing: Stripe holds a positive amount).
    steps = [step for step in (1, 100) if step < authorized]
    if not via_checkout and steps and draw(st.integers(0, 3)) == 0:
        increment = draw(st.sampled_from(steps))
    return Terms(
        lines,
        problem,
        amount,
        authorized,
        via_checkout=via_checkout,
        cart_on_intent=not via_checkout or draw(st.booleans()),
        cart_by_reference=draw(st.booleans()),
        subtotal=subtotal,
        shipping=shipping,
        discount=discount,
        tax=tax,
        increment=increment,
    )


@dataclass(frozen=True)
class Purchase:
    """One intent's ids and terms: what the builders of its events read."""

    intent_id: str
    cart_id: str | None  # the cart paid for (None: the intent names none, not the shop's)
    cart: model.Cart | None
    amount: int
    currency: str
    authorized: int
    via_checkout: bool = False
    cart_on_intent: bool = True
    cart_by_reference: bool = True
    subtotal: int = 0
    shipping: int = 0
    discount: int = 0
    tax: int = 0

    @property
    def intent_cart_id(self) -> str | None:
        """The cart in the intent's own metadata."""
        return self.cart_id if self.cart_on_intent else None


PATHS = (
    "capture",
    "authorize_only",
    "auto_capture",
    "cancel_after_auth",
    "expire",
    "cancel_before_auth",
    "fail_only",
    "in_progress",  # waiting for 3-D Secure or the rest of a transfer, or still processing
    "delayed",  # a delayed payment method through Checkout: paid (or failed) days later
)
# An event of a history: its second (from the history's start), type, and object.
Step = tuple[int, str, Callable[[Purchase], dict[str, Any]]]


class History:
    """One intent's events in the order Stripe would send them, `created` non-decreasing.

    Objects are built once the intent has its ids, so that hypothesis can drop
    a whole intent from a failing example while shrinking.
    """

    def __init__(self, draw: st.DrawFn, terms: Terms) -> None:
        self.draw, self.terms = draw, terms
        self.t = 0
        self.steps: list[Step] = []
        self.authorized_at: int | None = None  # second of the first authorization
        self.received = 0  # what was captured
        self.opened: dict[int, int] = {}  # when each refund was made (history seconds)
        self.released = 0  # the rest of a partial capture, released as a refund (pre-basil)

    def add(self, event_type: str, make: Callable[[Purchase], dict[str, Any]]) -> None:
        # Mostly the same second as the previous event: whole-second `created` ties.
        self.t += self.draw(st.sampled_from([0, 0, 1, 2]))
        self.steps.append((self.t, event_type, make))

    def intent(self, event_type: str, status: str, **fields: Any) -> None:
        self.add(event_type, lambda p: intent_object(p, status, **fields))

    def charge(self, event_type: str, **fields: Any) -> None:
        self.add(event_type, lambda p: charge_object(p, **fields))

    def refund(
        self,
        n: int,
        amount: int,
        status: str,
        event_type: str = "charge.refund.updated",
        reason: str | None = "requested_by_customer",
    ) -> None:
        opened = self.opened.setdefault(n, self.t)
        self.add(
            event_type,
            lambda p: {
                **refund_object(p, f"re_{p.intent_id}_{n}", amount, status, reason=reason),
                "created": opened,  # shifted with the history (`placed_in_time`)
            },
        )

    def session(self, payment_status: str, event_type: str) -> None:
        if self.terms.via_checkout:
            self.add(event_type, lambda p: session_object(p, payment_status))

    def disputed(self, event_type: str, status: str, reason: str) -> None:
        self.add(event_type, lambda p: dispute_object(p, status, reason))

    def failed_attempts(self, at_least: int = 0) -> None:
        for _ in range(self.draw(st.integers(at_least, 2))):
            first = self.draw(st.sampled_from([None, "requires_action", "processing"]))
            if first is not None:
                self.intent(f"payment_intent.{first}", first)
            self.intent("payment_intent.payment_failed", "requires_payment_method", failed=True)

    def authorize(self) -> None:
        if self.draw(st.booleans()):
            self.charge("charge.succeeded", captured=False)
        kind = self.draw(
            st.sampled_from(
                ["payment_intent.amount_capturable_updated", "payment_intent.authorized"]
            )
        )
        inc = self.terms.increment
        self.intent(kind, "requires_capture", capturable=self.terms.authorized - inc, less=inc)
        self._mark_authorized()
        if inc:  # an incremental authorization, a while later
            self.t += 1
            self.intent(
                "payment_intent.amount_capturable_updated",
                "requires_capture",
                capturable=self.terms.authorized,
            )
        self.session("unpaid", "checkout.session.completed")  # a hold: not paid yet

    def capture(self, *, held: bool = True) -> None:
        """Captured: the whole hold, or (a shop shipping less) part of it."""
        authorized = self.terms.authorized
        partial = held and authorized > 1 and self.draw(st.integers(0, 3)) == 0
        self.received = authorized * 3 // 5 if partial else authorized
        self.intent("payment_intent.succeeded", "succeeded", received=self.received)
        self._mark_authorized()
        if partial:
            # Before basil the released rest is a refund object, counted by the charge.
            self.released = authorized - self.received
            self.charge(
                "charge.captured",
                captured=True,
                amount_captured=self.received,
                amount_refunded=self.released,
            )
            if self.draw(st.booleans()):
                self.refund(99, self.released, "succeeded", reason=None)
        elif self.draw(st.booleans()):
            self.charge("charge.captured", captured=True)
        if not held:
            self.session("paid", "checkout.session.completed")

    def _mark_authorized(self) -> None:
        if self.authorized_at is None:
            self.authorized_at = self.t

    def refunds(self) -> None:
        amount = self.received or self.terms.authorized
        plan = self.draw(st.sampled_from([(), (amount,), (amount // 2,), (amount // 2, -1)]))
        refunded = 0
        for n, wanted in enumerate(plan):
            part = amount - amount // 2 if wanted == -1 else wanted
            outcome = self.draw(st.sampled_from(["succeeded", "pending", "failed"]))
            if outcome != "pending" and self.draw(st.booleans()):
                self.refund(n, part, "pending")
            if outcome == "succeeded":
                refunded += part
                self._charge_refunded("charge.refunded", refunded, amount)
                if self.draw(st.integers(0, 3)) == 0:
                    # Days later the issuer returns it: the refund failed, and the charge
                    # says less refunded.
                    self.refund(n, part, "succeeded")
                    self.t += 86_400
                    self.refund(n, part, "failed", "refund.failed")
                    refunded -= part
                    self._charge_refunded("charge.updated", refunded, amount)
                    continue
                if not self.draw(st.booleans()):
                    continue
            self.refund(n, part, outcome)

    def then(self, path: str) -> None:
        """What follows the payment on `path`."""
        if path == "capture":
            self.capture()
        if path in ("capture", "auto_capture"):
            self.refunds()
            self.dispute()
        elif path == "cancel_after_auth":
            reason = self.draw(
                st.sampled_from(["requested_by_customer", "abandoned", "fraudulent"])
            )
            self.cancel(reason)
            if self.draw(st.booleans()):
                self.release("charge.refunded")
        elif path == "expire":
            self.expire()

    def waiting(self) -> None:
        """Waiting for 3-D Secure, for the rest of a transfer, or still processing."""
        waiting = self.draw(st.sampled_from(["requires_action", "processing", "partially_funded"]))
        # A bank transfer that is partially funded waits for the rest in requires_action.
        status = "requires_action" if waiting == "partially_funded" else waiting
        self.intent(f"payment_intent.{waiting}", status)

    def delayed(self) -> None:
        """A delayed payment method through Checkout: the session completes unpaid, and
        days later Stripe says it was paid (or failed)."""
        if not self.terms.via_checkout:
            return  # a delayed method is a Checkout story here
        self.intent("payment_intent.processing", "processing")
        self.session("unpaid", "checkout.session.completed")
        self.t += 3 * 86_400
        if self.draw(st.booleans()):
            self.session("paid", "checkout.session.async_payment_succeeded")
            self._mark_authorized()
            self.capture(held=False)
            self.refunds()
        else:
            self.session("unpaid", "checkout.session.async_payment_failed")
            self.intent("payment_intent.payment_failed", "requires_payment_method", failed=True)

    def _charge_refunded(self, event_type: str, refunded: int, amount: int) -> None:
        self.charge(
            event_type,
            captured=True,
            amount_captured=self.received or self.terms.authorized,
            amount_refunded=refunded + self.released,
            refunded=refunded >= amount,
        )

    def dispute(self) -> None:
        if not self.draw(st.booleans()):
            return
        warning = self.draw(st.booleans())
        reason = self.draw(st.sampled_from(["fraudulent", "product_not_received"]))
        prefix = "warning_" if warning else ""
        self.disputed("charge.dispute.created", f"{prefix}needs_response", reason)
        if not warning and self.draw(st.booleans()):
            self.disputed("charge.dispute.funds_withdrawn", "needs_response", reason)
        if self.draw(st.booleans()):
            self.disputed("charge.dispute.updated", f"{prefix}under_review", reason)
        if self.draw(st.booleans()):
            closed = "warning_closed" if warning else self.draw(st.sampled_from(["won", "lost"]))
            self.disputed("charge.dispute.closed", closed, reason)

    def cancel(self, reason: str) -> None:
        self.intent("payment_intent.canceled", "canceled", cancellation_reason=reason)

    def release(self, event_type: str) -> None:
        """The uncaptured charge, its hold released (reported by Stripe as refunded)."""
        self.charge(
            event_type, captured=False, amount_refunded=self.terms.authorized, refunded=True
        )

    def expire(self) -> None:
        released = self.draw(st.booleans())
        steps: list[Callable[[], None]] = [
            lambda: (
                self.release("charge.expired")
                if released
                else self.charge("charge.expired", captured=False)
            )
        ]
        if self.draw(st.booleans()):
            steps.append(lambda: self.cancel("automatic"))
            if self.draw(st.booleans()):
                steps.reverse()
        for step in steps:
            step()


@st.composite
def histories(draw: st.DrawFn, paying: Terms | None = None) -> History:
    h = History(draw, paying or draw(terms()))
    # Paid and not canceled twice as often as anything else: those compete for stock.
    path = draw(st.sampled_from(PATHS[:3] + PATHS))
    h.intent("payment_intent.created", "requires_payment_method")
    h.failed_attempts(at_least=1 if path == "fail_only" else 0)
    if path == "fail_only":
        return h
    if path == "in_progress":
        h.waiting()
        return h
    before = draw(st.sampled_from([None, "requires_action", "processing"]))
    if before is not None:
        h.intent(f"payment_intent.{before}", before)
    if path == "cancel_before_auth":
        h.cancel(draw(st.sampled_from(["requested_by_customer", "abandoned"])))
        return h
    if path == "delayed":
        h.delayed()
        return h
    if path == "auto_capture":
        if draw(st.booleans()):
            h.charge("charge.succeeded", captured=True)
        h.capture(held=False)
    else:
        h.authorize()
    h.then(path)
    return h


def summary(evt: dict[str, Any]) -> str:
    """One line per event for a falsifying example: what the model and the consumer read."""
    obj = evt["data"]["object"]
    kind = obj["object"]
    if kind == "payment_intent":
        held = f" capturable={obj['amount_capturable']}" if obj["amount_capturable"] else ""
        got = f" received={obj['amount_received']}" if obj["amount_received"] else ""
        why = f" reason={obj['cancellation_reason']}" if obj["cancellation_reason"] else ""
        what = f"{obj['status']}{held}{got}{why}"
    elif kind == "charge":
        what = (
            f"captured={obj['amount_captured']} amount_refunded={obj['amount_refunded']}"
            f" refunded={obj['refunded']}"
        )
    elif kind == "checkout.session":
        cart = obj["client_reference_id"] or obj["metadata"].get("cart_id")
        what = f"{obj['payment_status']} cart={cart} subtotal={obj['amount_subtotal']}"
    else:
        what = f"{obj['id']} {obj['status']} amount={obj['amount']}"
    return f"{evt['created']} {evt['id']} {evt['type']} {what}"


@dataclass(frozen=True)
class Scenario:
    stock: dict[str, int]
    purchases: list[Purchase]
    events: list[dict[str, Any]]  # each event once, in no particular order

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        """What hypothesis prints for a falsifying example: compact, one event a line."""
        lines = ["stock " + " ".join(f"{sku}={q}" for sku, q in self.stock.items())]
        for p in self.purchases:
            cart = (
                "missing"
                if p.cart is None
                else p.cart.currency + " " + " ".join(f"{s}x{q}@{u}" for s, q, u in p.cart.lines)
            )
            via = f" checkout(subtotal={p.subtotal})" if p.via_checkout else ""
            lines.append(
                f"{p.intent_id} cart_id={p.cart_id} cart=[{cart}] "
                f"amount={p.amount} authorized={p.authorized}{via}"
            )
            lines += [
                "    " + summary(e)
                for e in sorted(self.events, key=lambda e: (e["created"], e["id"]))
                if model.intent_of(e) == p.intent_id
            ]
        printer.text("\n".join(lines))

    @property
    def twins(self) -> set[str]:
        """The intents that pay for a cart another intent pays for too."""
        payers = Counter(p.cart_id for p in self.purchases if p.cart_id)
        return {p.intent_id for p in self.purchases if p.cart_id and payers[p.cart_id] > 1}

    @property
    def carts(self) -> dict[str, model.Cart]:
        return {
            p.cart_id or f"cart-of-{p.intent_id}": p.cart
            for p in self.purchases
            if p.cart is not None
        }


def placed_in_time(
    index: int, slot: int, history: History, cart_index: int
) -> tuple[Purchase, list[dict[str, Any]]]:
    """The intent's ids and its events, its first authorization at its own second.

    `cart_index` names the cart: the intent's own, or the one an earlier intent
    pays for too (a checkout submitted twice).
    """
    t = history.terms
    purchase = Purchase(
        intent_id=f"pi_{index:03d}",
        cart_id=None if t.problem == "no_cart_id" else f"cart-{cart_index}",
        cart=t.cart,
        amount=t.amount,
        currency="usd",
        authorized=t.authorized,
        via_checkout=t.via_checkout,
        cart_on_intent=t.cart_on_intent,
        cart_by_reference=t.cart_by_reference,
        subtotal=t.subtotal,
        shipping=t.shipping,
        discount=t.discount,
        tax=t.tax,
    )
    anchor = history.authorized_at if history.authorized_at is not None else 0
    shift = BASE_S + slot * SPACING_S - anchor
    opened = history.steps[0][0] + shift
    built = []
    for second, event_type, make in history.steps:
        evt = events.event(make(purchase), event_type, event_id="evt_unnumbered")
        evt["created"] = second + shift
        # A payment intent's own `created` is its first event's; a refund's, when it was
        # made (its history second); other objects', their event's.
        obj = evt["data"]["object"]
        if obj["object"] == "payment_intent":
            obj["created"] = opened
        elif obj["object"] == "refund":
            obj["created"] += shift
        else:
            obj["created"] = evt["created"]
        built.append(evt)
    return purchase, built


@st.composite
def scenarios(draw: st.DrawFn, *, scarce: bool) -> Scenario:
    if scarce:
        stock = {sku: draw(st.sampled_from([1, 2, 3, 0, 5, ABUNDANT])) for sku in SKUS}
    else:
        stock = dict.fromkeys(SKUS, ABUNDANT)
    # Scarce stock needs payments that compete for it: three make a contest likely.
    count = draw(st.integers(3 if scarce else 1, 6))
    # One intent in four pays again for an earlier intent's cart (same terms): one
    # of the two is the cart's order, the other a duplicate.
    carts_of: list[int] = []
    paying: list[Terms] = []
    for index in range(count):
        twin = draw(st.integers(0, index - 1)) if index and draw(st.integers(0, 3)) == 0 else None
        carts_of.append(index if twin is None else carts_of[twin])
        paying.append(draw(terms()) if twin is None else paying[twin])
    plans = [draw(histories(t)) for t in paying]
    slots = draw(st.permutations(range(len(plans))))
    bought: list[Purchase] = []
    all_events: list[dict[str, Any]] = []
    for index, (slot, history) in enumerate(zip(slots, plans, strict=True)):
        purchase, built = placed_in_time(index, slot, history, carts_of[index])
        bought.append(purchase)
        all_events.extend(built)
    # Event ids in a random order, so that same-second ties fall either way.
    numbers = draw(st.permutations(range(len(all_events))))
    for evt, number in zip(all_events, numbers, strict=True):
        evt["id"] = f"evt_{number:05d}"
    return Scenario(stock, bought, all_events)


# ---------------------------------------------------------------------------
# Delivery: duplicates, one shuffle across intents and partitions, batches.


@dataclass(frozen=True)
class Record:
    """What the worker hands `decode`: the fields of an aiokafka ConsumerRecord it reads."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: Sequence[tuple[str, bytes]]
    timestamp: int = 0


@dataclass(frozen=True)
class Copy:
    """One delivered copy of an event."""

    event: dict[str, Any]  # as the model reads it
    envelope: Envelope  # as the consumer gets it, through the real decode
    arrival: model.Arrival  # (received-at ms, partition, offset)


@dataclass(frozen=True)
class Delivery:
    batches: list[list[Copy]]  # each applied in one call of apply_batch

    def for_model(self) -> list[list[tuple[dict[str, Any], model.Arrival]]]:
        return [[(c.event, c.arrival) for c in batch] for batch in self.batches]

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        printer.text(
            "\n".join(
                f"batch {n}: "
                + " ".join(f"{c.event['id']}@{c.arrival[1]}:{c.arrival[2]}" for c in batch)
                for n, batch in enumerate(self.batches, 1)
            )
        )


@st.composite
def deliveries(draw: st.DrawFn, scenario: Scenario, *, batches: bool) -> Delivery:
    """Every event 1-4 times, in one random order, cut into batches at random points."""
    size = len(scenario.events)
    copies = draw(st.lists(st.integers(0, 3), min_size=size, max_size=size))
    sent = [
        evt for evt, extra in zip(scenario.events, copies, strict=True) for _ in range(1 + extra)
    ]
    order = draw(st.permutations(range(len(sent))))
    delivered = list(_copies([sent[i] for i in order]))
    if not batches or len(delivered) < 2:
        return Delivery([delivered])
    if draw(st.booleans()):  # a few batches, cut anywhere
        cuts = draw(st.sets(st.integers(1, len(delivered) - 1), min_size=1, max_size=8))
    else:  # small batches, as a consumer polling a busy topic gets them
        size = draw(st.integers(1, 8))
        cuts = set(range(size, len(delivered), size))
    bounds = [0, *sorted(cuts), len(delivered)]
    return Delivery([delivered[a:b] for a, b in pairwise(bounds)])


def _copies(delivered: list[dict[str, Any]]) -> Iterator[Copy]:
    """Each event as a record of its intent's partition, offsets and received-at increasing."""
    offsets = Counter[int]()
    for n, evt in enumerate(delivered):
        intent = model.intent_of(evt)
        assert intent is not None
        partition = zlib.crc32(intent.encode()) % PARTITIONS
        received_at_ms = BASE_MS + 7 * n
        record = Record(
            topic="stripe.events",
            partition=partition,
            offset=offsets[partition],
            key=encode_key(intent),
            value=events.encode(evt),
            headers=contract_headers(evt["id"], evt["type"], received_at_ms),
        )
        offsets[partition] += 1
        decoded = decode(record)
        assert isinstance(decoded, Envelope), decoded
        yield Copy(evt, decoded, (received_at_ms, record.partition, record.offset))

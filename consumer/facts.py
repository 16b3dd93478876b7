"""What is known of one payment intent, merged from its events, and the order terms it gives.

Values only, no I/O. `Facts` holds, per intent, the latest snapshot of each thing
Stripe tells about it (its status, its latest authorization, its captured
charge, each refund, its dispute, the Checkout Session that made it, Radar's
review and early fraud warning); consumer/lifecycle.py merges events into them
so that they depend on the set of events seen, never on their order.

`terms(facts)` is what an order is decided on (consumer/allocation.py): the
cart, what the buyer was asked to pay and what the cart must total, what is
held or was received. It joins the intent and its Checkout Session: the cart is
the intent's `CART_METADATA_KEY` metadata, else the session's metadata under
the same key, else its `client_reference_id`; with a session, the cart is
checked against the session's `amount_subtotal` (in the shop's currency, under
Adaptive Pricing its `currency_conversion`), the rest of the total being
shipping and tax less discounts.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import NamedTuple

# A dispute in one of these statuses no longer holds the money against us.
DISPUTE_SETTLED_FOR_US = frozenset({"won", "warning_closed", "prevented", "charge_refunded"})

# Refund statuses whose money is on its way back, or back; `failed` and `canceled` are not
# (Stripe's refund object: https://docs.stripe.com/api/refunds/object#refund_object-status).
REFUND_COUNTS = frozenset({"pending", "requires_action", "succeeded"})
REFUND_STOPPED = frozenset({"failed", "canceled"})

# Where a snapshot stands among others of its thing: (event created, step, event id).
Key = tuple[int, int, str]


# A dispute in one of these statuses is over: the money went with it, or stayed.
DISPUTE_CLOSED = frozenset({"won", "lost", "warning_closed", "prevented", "charge_refunded"})
# A dispute in one of these statuses has taken its amount back from us: a chargeback open
# or lost (an inquiry, `warning_*`, takes nothing; a dispute won gives it back).
DISPUTE_WITHDRAWN = frozenset(
    {"needs_response", "under_review", "lost", "appeal_needs_response", "appeal_under_review"}
)


@dataclass(frozen=True, slots=True)
class Dispute:
    id: str
    status: str
    amount: int
    reason: str
    created: int  # the event's, for ordering snapshots
    # Stripe's `is_charge_refundable`: the payment can still be refunded while disputed.
    refundable: bool = False

    @property
    def against_us(self) -> bool:
        return self.status not in DISPUTE_SETTLED_FOR_US

    @property
    def holds(self) -> int:
        """What the dispute has taken back from us (the customer gets it through it)."""
        return self.amount if self.status in DISPUTE_WITHDRAWN else 0

    @property
    def blocks_refund(self) -> bool:
        """Open, and Stripe would refuse a refund of the disputed payment."""
        return self.status not in DISPUTE_CLOSED and not self.refundable


@dataclass(frozen=True, slots=True)
class RefundSnapshot:
    amount: int
    status: str
    created: int  # the event's: when the refund was in this status
    opened: int  # the refund's own `created`: when it was made


class ChargeSnapshot(NamedTuple):
    """The intent's captured charge, at its latest snapshot by `key`."""

    key: Key
    # Money sent back by the charge's account: its `amount_refunded` less the rest of a
    # partial capture that Stripe released (it shows as refunded; nobody sent it back).
    refunded: int
    in_full: bool  # the charge's `refunded`


class Authorization(NamedTuple):
    """The intent's latest authorization by `key` (an increment moves it, in any delivery
    order), or, for a payment captured at once, its latest capture: a hold outranks a
    capture, so that capturing less than was held (the shop's choice, after the order)
    does not read as an authorization that fell short."""

    key: Key
    amount: int  # the intent's `amount`: what the buyer was asked to pay
    currency: str
    held: int  # `amount_capturable` while held, `amount_received` once captured
    captured: bool = False  # from a capture (`succeeded`), not a hold

    @property
    def rank(self) -> tuple[bool, Key]:
        return (not self.captured, self.key)


class Named(NamedTuple):
    """The cart the intent's metadata names: from its earliest snapshot that holds the
    money (what the buyer paid for then; metadata changed later does not move the
    order), else from its latest snapshot that names one."""

    key: Key
    cart_id: str
    held: bool  # the snapshot is an authorization (the money held or received)

    def names_over(self, old: Named | None) -> bool:
        """Whether this snapshot's cart replaces `old`'s."""
        if old is None or self.held != old.held:
            return old is None or self.held
        return self.key < old.key if self.held else self.key > old.key


class Checkout(NamedTuple):
    """The Checkout Session that made the intent, at its latest snapshot by `key`."""

    key: Key
    session_id: str
    cart_id: str | None
    subtotal: int | None  # the items, in `currency`: what the cart must total
    currency: str | None  # the shop's (source) currency
    total: int | None  # what the buyer was asked to pay, in `total_currency`
    total_currency: str | None  # the buyer's (presentment) currency
    shipping: int
    discount: int
    tax: int
    paid: bool  # payment_status `paid`: the money was received (a delayed method too)


class Review(NamedTuple):
    """Radar's review of the payment, at its latest snapshot by (created, open < closed, id)."""

    key: Key
    id: str
    open: bool
    reason: str
    closed_reason: str | None

    @property
    def holds_capture(self) -> bool:
        """Open: a capture waits until Stripe closes it `approved`."""
        return self.open


class FraudWarning(NamedTuple):
    """An early fraud warning from the card's issuer, at its latest snapshot by `key`."""

    key: Key
    id: str
    actionable: bool
    fraud_type: str


_NO_REFUNDS: Mapping[str, RefundSnapshot] = MappingProxyType({})


class Terms(NamedTuple):
    """What an order is decided on, from the intent's facts (`terms`)."""

    cart_id: str
    amount: int  # what the buyer was asked to pay
    currency: str
    authorized: int  # what is held or was received, in `currency`
    cart_amount: int  # what the cart must total: the session's subtotal, else `amount`
    cart_currency: str
    shipping: int = 0
    discount: int = 0
    tax: int = 0


class Facts(NamedTuple):
    """What is known of one intent, merged from every event seen in any order.

    A NamedTuple, like the other values built per event or per intent on the hot
    path (`PlaceOrder`, `consumer.fold.IntentState`): a frozen dataclass costs
    about 3 µs to build here and a NamedTuple under 1; the fold built three per
    intent and fell 17 % behind the code before it in the consumer bench.
    """

    status: str | None = None
    # The key of the event that set `status`: (created, step, event id); the
    # status's tier leads the key (consumer/lifecycle.py).
    status_created: int | None = None
    status_step: int | None = None
    status_event_id: str | None = None
    cancellation_reason: str | None = None
    charge: ChargeSnapshot | None = None
    refunds: Mapping[str, RefundSnapshot] = _NO_REFUNDS
    dispute: Dispute | None = None
    # Connect: the account the intent lives on (the events' `account`); None: the platform's.
    account: str | None = None
    # The most Stripe says it captured: the intent's `amount_received`, a charge's
    # `amount_captured`. What a refund of an order that cannot be filled returns.
    amount_received: int = 0
    # When an uncaptured authorization lapses (the charge's capture_before, Unix time).
    capture_before: int | None = None
    # The rest of a partial capture that Stripe released as a refund object, before API
    # 2025-03-31.basil: among the refunds, and no money sent back.
    released: int = 0
    authorization: Authorization | None = None
    # When the money was first held or received (the earliest authorizing event's
    # `created`): what orders are served by, first paid first.
    paid_at: int | None = None
    named: Named | None = None
    checkout: Checkout | None = None
    review: Review | None = None
    fraud_warning: FraudWarning | None = None

    @property
    def canceled(self) -> bool:
        return self.status == "canceled"

    @property
    def amount_refunded(self) -> int:
        """Money sent back: the refunds that count (less the rest of a partial capture
        released as one), or the charge's latest word when it says more (refunds this
        consumer never saw), less any refund that stopped counting after that word; never
        more than was captured (what a released hold "refunds" is no money back)."""
        counted = sum(r.amount for r in self.refunds.values() if r.status in REFUND_COUNTS)
        sent_back = max(self._charge_refunded(), counted - self.released)
        return max(min(sent_back, self.amount_received), 0)

    def _charge_refunded(self) -> int:
        charge = self.charge
        if charge is None:
            return 0
        stopped = self._stopped_since_charge()
        return max(charge.refunded - stopped, 0)

    def _stopped_since_charge(self) -> int:
        """Refunds that failed or were canceled after the charge's latest snapshot, which
        they were made before: that snapshot still counts them."""
        charge = self.charge
        assert charge is not None
        said_at = charge.key[0]
        return sum(
            r.amount
            for r in self.refunds.values()
            if r.status in REFUND_STOPPED and r.opened <= said_at < r.created
        )

    def refunded_in_full(self, order_amount: int) -> bool:
        """All the money taken is back: the charge says so (and no refund stopped since),
        or the refunds reach what was captured (the order's amount if nothing was)."""
        charge = self.charge
        if charge is not None and charge.in_full and not self._stopped_since_charge():
            return True
        target = self.amount_received or order_amount
        return 0 < target <= self.amount_refunded

    @property
    def disputed(self) -> bool:
        """A dispute holds the money against us: the order is `disputed`."""
        return self.dispute is not None and self.dispute.against_us

    @property
    def owed_back(self) -> int:
        """Captured money neither refunded nor taken back by a dispute: what an order that
        cannot be filled still owes its customer."""
        held = self.dispute.holds if self.dispute is not None else 0
        return max(self.amount_received - self.amount_refunded - held, 0)

    @property
    def refund_stopped(self) -> bool:
        """A refund of the intent failed or was canceled."""
        return self.refund_stopped_at is not None

    @property
    def refund_stopped_at(self) -> int | None:
        """When the latest refund of the intent to fail or be canceled did (its event's
        `created`), or None."""
        return max(
            (r.created for r in self.refunds.values() if r.status in REFUND_STOPPED), default=None
        )

    @property
    def refund_blocked(self) -> bool:
        """An open dispute that Stripe says keeps the payment from being refunded."""
        return self.dispute is not None and self.dispute.blocks_refund

    @property
    def paid(self) -> bool:
        """The money is held or was received: an authorization, or a paid Checkout Session."""
        return self.authorization is not None or (
            self.checkout is not None and self.checkout.paid and self.checkout.total is not None
        )

    @property
    def cart_id(self) -> str | None:
        """The shop's cart: the intent's metadata, else the session's."""
        if self.named is not None:
            return self.named.cart_id
        return self.checkout.cart_id if self.checkout is not None else None

    @property
    def capture_held(self) -> bool:
        """A capture waits: Radar's review is open, or the issuer warned of fraud (the shop
        settles a warning: refund, or capture by hand)."""
        return (self.review is not None and self.review.holds_capture) or (
            self.fraud_warning is not None
        )


def terms(facts: Facts) -> Terms | None:
    """What the intent's order is decided on; None while no order can be made (the money
    is not held or received yet, or the intent names no cart: not the shop's)."""
    cart_id = facts.cart_id
    if cart_id is None or not facts.paid:
        return None
    auth, session = facts.authorization, facts.checkout
    if auth is not None:
        amount, currency, held = auth.amount, auth.currency, auth.held
    else:
        assert session is not None and session.total is not None  # `paid` said so
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

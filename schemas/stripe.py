"""The parts of Stripe's objects that intentflow reads: the event, the payment intent, its
charges, refunds and disputes, the Checkout Session that made it, and Radar's review and
early fraud warning about it.

Stripe adds fields to its objects without notice, so every model ignores what it
does not know instead of rejecting it. Models are frozen value types.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


class _StripeModel(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore")


# Bounds on what the consumer stores in indexed columns and bigints: an event
# outside them is not one Stripe sends, and PostgreSQL would refuse it (an index
# entry over 2,704 bytes, a bigint overflow) only after a round trip. Stripe's
# ids are a prefix and about 24 characters; its amounts fit in eight digits.
StripeId = Annotated[str, Field(min_length=1, max_length=255)]
Amount = Annotated[int, Field(ge=0, le=2**63 - 1)]


class PaymentIntent(_StripeModel):
    object: Literal["payment_intent"]
    id: StripeId
    status: str
    amount: Amount
    currency: Annotated[str, Field(max_length=16)]
    metadata: dict[str, str] = {}
    # What the card issuer holds for a manual capture, and what was captured.
    # Stripe always sends both; None (an event built by hand) authorizes nothing.
    amount_capturable: Amount | None = None
    amount_received: Amount | None = None
    cancellation_reason: Annotated[str, Field(max_length=64)] | None = None

    def cart(self, key: str) -> str | None:
        """The shop's cart id under metadata `key` (CART_METADATA_KEY); None when absent
        or empty: then the intent is not the shop's order."""
        return self.metadata.get(key) or None


class CardDetails(_StripeModel):
    # With manual capture: when Stripe lets the authorization lapse (Unix time).
    # stripe-python types it `Charge.PaymentMethodDetails.Card.capture_before`.
    capture_before: int | None = None


class PaymentMethodDetails(_StripeModel):
    card: CardDetails | None = None


class Charge(_StripeModel):
    object: Literal["charge"]
    id: StripeId
    payment_intent: StripeId | None = None
    amount: Amount = 0
    # What was captured: less than `amount` after a partial capture, 0 while held.
    amount_captured: Amount = 0
    amount_refunded: Amount = 0
    currency: Annotated[str, Field(max_length=16)] = ""
    refunded: bool = False
    # False for an authorization not (yet) captured: what Stripe then reports as
    # refunded is the hold released (an expiry, a cancel), not money sent back.
    captured: bool = True
    payment_method_details: PaymentMethodDetails | None = None

    @property
    def capture_before(self) -> int | None:
        details = self.payment_method_details
        return None if details is None or details.card is None else details.card.capture_before


class Dispute(_StripeModel):
    """A chargeback (`charge.dispute.*`): it names its intent since API 2020-03-02."""

    object: Literal["dispute"]
    id: StripeId
    charge: StripeId | None = None
    payment_intent: StripeId | None = None
    amount: Amount = 0
    currency: Annotated[str, Field(max_length=16)] = ""
    reason: Annotated[str, Field(max_length=64)] = ""
    status: Annotated[str, Field(max_length=64)] = ""

    @field_validator("reason", mode="before")
    @classmethod
    def _reason_may_be_null(cls, value: Any) -> Any:
        # Typed non-null by Stripe, but a dispute without one is still a dispute.
        return "" if value is None else value


class Refund(_StripeModel):
    """A refund (`charge.refund.updated`): money going back on one charge."""

    object: Literal["refund"]
    id: StripeId
    charge: StripeId | None = None
    payment_intent: StripeId | None = None
    amount: Amount = 0
    currency: Annotated[str, Field(max_length=16)] = ""
    status: Annotated[str, Field(max_length=64)] = ""

    @field_validator("status", mode="before")
    @classmethod
    def _status_may_be_null(cls, value: Any) -> Any:
        # Stripe's spec has the refund's status nullable (stripe-python types it
        # Optional[str]): a null one is a refund of no known state, not poison.
        return "" if value is None else value


class TotalDetails(_StripeModel):
    amount_discount: Amount = 0
    amount_shipping: Amount = 0
    amount_tax: Amount = 0

    @field_validator("amount_shipping", mode="before")
    @classmethod
    def _no_shipping_is_zero(cls, value: Any) -> Any:
        # Nullable at Stripe (stripe-python types it Optional[int]; Stripe's own example
        # session has it null): a session that ships nothing, not poison.
        return 0 if value is None else value


class CurrencyConversion(_StripeModel):
    """Adaptive Pricing: the session's amounts are in the buyer's currency; these are in
    the shop's (`source_currency`), where its cart is (stripe-python
    `checkout.Session.CurrencyConversion`)."""

    amount_subtotal: Amount
    amount_total: Amount
    source_currency: Annotated[str, Field(max_length=16)]


class CheckoutSession(_StripeModel):
    """A Checkout Session (`checkout.session.*`; Payment Links make them too). The shop's
    cart rides on it (`metadata`, `client_reference_id`) and it names its intent."""

    object: Literal["checkout.session"]
    id: StripeId
    mode: Annotated[str, Field(max_length=32)] = "payment"  # payment, setup or subscription
    payment_intent: StripeId | None = None  # none for a session that expired unpaid
    client_reference_id: Annotated[str, Field(max_length=200)] | None = None
    metadata: dict[str, str] = {}
    amount_subtotal: Amount | None = None  # the items, before discounts, shipping and tax
    amount_total: Amount | None = None  # what the buyer was asked to pay
    currency: Annotated[str, Field(max_length=16)] | None = None
    total_details: TotalDetails | None = None
    currency_conversion: CurrencyConversion | None = None
    payment_status: Annotated[str, Field(max_length=32)] = "unpaid"  # paid, unpaid, ...
    status: Annotated[str, Field(max_length=32)] | None = None  # open, complete, expired

    def cart(self, key: str) -> str | None:
        """The shop's cart: the session's metadata under `key`, else its client_reference_id."""
        return self.metadata.get(key) or self.client_reference_id or None


class Review(_StripeModel):
    """A Radar review (`review.opened`, `review.closed`) of a payment."""

    object: Literal["review"]
    id: StripeId
    payment_intent: StripeId | None = None
    charge: StripeId | None = None
    open: bool = False
    reason: Annotated[str, Field(max_length=64)] = ""
    closed_reason: Annotated[str, Field(max_length=64)] | None = None


class EarlyFraudWarning(_StripeModel):
    """A card issuer's early fraud warning (`radar.early_fraud_warning.*`)."""

    object: Literal["radar.early_fraud_warning"]
    id: StripeId
    payment_intent: StripeId | None = None
    charge: StripeId | None = None
    actionable: bool = True
    fraud_type: Annotated[str, Field(max_length=64)] = ""


# The object kinds that have a model of their own.
MODELLED_OBJECTS = frozenset(
    {
        "payment_intent",
        "charge",
        "dispute",
        "refund",
        "checkout.session",
        "review",
        "radar.early_fraud_warning",
    }
)
# Models whose object names its payment intent in `payment_intent`.
_NAMES_ITS_INTENT = (Charge, Dispute, Refund, CheckoutSession, Review, EarlyFraudWarning)


class OtherObject(_StripeModel):
    """Any other Stripe object (customer, invoice, …): only its kind and id are read."""

    object: str
    id: str | None = None

    @field_validator("object")
    @classmethod
    def _not_a_kind_we_read(cls, value: str) -> str:
        # An object of a modelled kind that failed its own model must not pass as "other".
        if value in MODELLED_OBJECTS:
            raise ValueError(f"an invalid {value} object")
        return value


# Tried in order; each model's `object` literal rejects the wrong kind at once.
# (A callable discriminator would make pydantic build the whole object as Python
# data first, which doubled the consumer's decoding time.)
StripeObject = Annotated[
    PaymentIntent
    | Charge
    | Dispute
    | Refund
    | CheckoutSession
    | Review
    | EarlyFraudWarning
    | OtherObject,
    Field(union_mode="left_to_right"),
]


class EventData(_StripeModel):
    object: StripeObject


class StripeEvent(_StripeModel):
    id: StripeId
    type: Annotated[str, Field(min_length=1, max_length=255)]
    created: int
    livemode: bool = False
    # Connect: the connected account the object lives on (every call about it
    # must send `Stripe-Account`); absent for the platform's own objects.
    account: Annotated[str, Field(max_length=255)] | None = None
    data: EventData

    @property
    def payment_intent_id(self) -> str | None:
        """The payment intent this event concerns, or None when it concerns none."""
        obj = self.data.object
        # `type(...) is`, not isinstance: pydantic's metaclass makes isinstance an
        # ABC check, and this runs several times per event on the consumer's hot path.
        if type(obj) is PaymentIntent:
            return obj.id
        if type(obj) in _NAMES_ITS_INTENT:
            return obj.payment_intent  # type: ignore[union-attr]
        return None

"""The parts of Stripe's Event, PaymentIntent and Charge objects that intentflow reads.

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


# The object kinds that have a model of their own.
MODELLED_OBJECTS = frozenset({"payment_intent", "charge", "dispute", "refund"})


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
    PaymentIntent | Charge | Dispute | Refund | OtherObject, Field(union_mode="left_to_right")
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
        if type(obj) is Charge or type(obj) is Dispute or type(obj) is Refund:
            return obj.payment_intent
        return None

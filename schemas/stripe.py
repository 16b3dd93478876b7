"""The parts of Stripe's Event, PaymentIntent and Charge objects that intentflow reads.

Stripe adds fields to its objects without notice, so every model ignores what it
does not know instead of rejecting it. Models are frozen value types.
"""

from __future__ import annotations

from typing import Annotated, Literal

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

    @property
    def cart_id(self) -> str | None:
        return self.metadata.get("cart_id") or None


class Charge(_StripeModel):
    object: Literal["charge"]
    id: StripeId
    payment_intent: StripeId | None = None
    amount: Amount = 0
    amount_refunded: Amount = 0
    currency: Annotated[str, Field(max_length=16)] = ""
    refunded: bool = False


class OtherObject(_StripeModel):
    """Any other Stripe object (customer, invoice, …): only its kind and id are read."""

    object: str
    id: str | None = None

    @field_validator("object")
    @classmethod
    def _not_a_kind_we_read(cls, value: str) -> str:
        # A payment intent or charge that failed its own model must not pass as "other".
        if value in ("payment_intent", "charge"):
            raise ValueError(f"an invalid {value} object")
        return value


# Tried in order; each model's `object` literal rejects the wrong kind at once.
# (A callable discriminator would make pydantic build the whole object as Python
# data first, which doubled the consumer's decoding time.)
StripeObject = Annotated[PaymentIntent | Charge | OtherObject, Field(union_mode="left_to_right")]


class EventData(_StripeModel):
    object: StripeObject


class StripeEvent(_StripeModel):
    id: StripeId
    type: Annotated[str, Field(min_length=1, max_length=255)]
    created: int
    livemode: bool = False
    data: EventData

    @property
    def payment_intent_id(self) -> str | None:
        """The payment intent this event concerns, or None when it concerns none."""
        obj = self.data.object
        # `type(...) is`, not isinstance: pydantic's metaclass makes isinstance an
        # ABC check, and this runs several times per event on the consumer's hot path.
        if type(obj) is PaymentIntent:
            return obj.id
        if type(obj) is Charge:
            return obj.payment_intent
        return None


# Event types intentflow gives meaning to. Stripe has no `payment_intent.authorized`;
# some teams use that name internally, so it is accepted as a synonym.
AUTHORIZATION_EVENTS = frozenset(
    {
        "payment_intent.amount_capturable_updated",
        "payment_intent.authorized",
        "payment_intent.succeeded",
    }
)

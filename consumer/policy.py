"""What the shop decides about its payments: the consumer settings that shape decisions.

Read once from the settings (`ShopPolicy.from_settings`) and the same on every
member of the group: the fold reads the cart key, the outbox the capture and
refund policies. A relay applies its own copy to the actions it performs
(consumer/stripe_actions.py, `ActionSpec.allowed`), so a rolling change of a
policy neither moves money against it nor drops what was asked.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol


class CapturePolicy(StrEnum):
    NEVER = "never"  # the shop captures (at shipping, from its dashboard)
    ON_PLACED = "on_placed"  # capture as soon as the stock is taken


# The metadata key that names the shop's cart on a PaymentIntent (CART_METADATA_KEY).
DEFAULT_CART_KEY = "cart_id"


class _PolicySettings(Protocol):
    @property
    def capture_policy(self) -> str: ...
    @property
    def refund_unfillable(self) -> bool: ...
    @property
    def cart_metadata_key(self) -> str: ...


@dataclass(frozen=True, slots=True)
class ShopPolicy:
    capture: CapturePolicy = CapturePolicy.NEVER
    # Refund the captured money of an order that cannot be filled (out_of_stock,
    # duplicate). False: the refund is recorded as owed, for an operator.
    refund_unfillable: bool = True
    cart_key: str = DEFAULT_CART_KEY

    @classmethod
    def from_settings(cls, settings: _PolicySettings) -> ShopPolicy:
        return cls(
            CapturePolicy(settings.capture_policy),
            settings.refund_unfillable,
            settings.cart_metadata_key,
        )


DEFAULT_POLICY = ShopPolicy()

"""Turn Kafka records into Stripe events, or into poison with a reason.

A record is poison when no retry can make it valid: its value is not a Stripe
event, or its key does not name the payment intent the event concerns (the key
is what gives per-intent ordering, so a wrong key breaks invariant 6).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from intentflow.consumer.dlq import Poison
from intentflow.schemas import HEADER_RECEIVED_AT, StripeEvent

__all__ = ["Envelope", "Poison", "decode"]


@dataclass(frozen=True, slots=True)
class Envelope:
    """A decoded event and where it came from."""

    event: StripeEvent
    record: Any  # the aiokafka ConsumerRecord, kept for dead-lettering
    intent_id: str | None  # the payment intent the event concerns (= the record's key)

    @property
    def partition(self) -> int:
        return int(self.record.partition)

    @property
    def offset(self) -> int:
        return int(self.record.offset)

    @property
    def arrival(self) -> tuple[int, int, int]:
        """(received-at ms, partition, offset): when and where the bridge put it."""
        received_at_ms = 0
        for name, value in self.record.headers or ():
            if name == HEADER_RECEIVED_AT:
                received_at_ms = int(value) if value and value.isdigit() else 0
                break
        return (received_at_ms, self.partition, self.offset)


def decode(record: Any) -> Envelope | Poison:
    value = record.value
    if value is None:
        return Poison(record, "empty_value", "the record has no value (tombstone)")
    try:
        event = StripeEvent.model_validate_json(value)
    except ValidationError as exc:
        first = exc.errors(include_url=False, include_input=False)[0]
        error = "invalid_json" if first["type"] == "json_invalid" else "invalid_event"
        where = ".".join(str(part) for part in first["loc"])
        return Poison(record, error, f"{where}: {first['msg']}"[:500])
    intent_id = event.payment_intent_id
    if intent_id is not None:
        key = record.key.decode("utf-8", "replace") if record.key is not None else None
        if key != intent_id:
            return Poison(
                record,
                "key_mismatch",
                f"key {key!r} is not the event's payment intent {intent_id!r}",
            )
    return Envelope(event, record, intent_id)

"""Stripe's Events API read as the bridge's webhooks: whole slices of a window, oldest
first, and each event made into the record the bridge would publish.

A slice is read whole, every page, all types at once
(https://docs.stripe.com/api/events/list). Stripe lists newest first; a slice is put
back in creation order, as Stripe created the events. `record` is producer/webhook.py's
publishing step for a parsed event, for the types the endpoint is asked to send
(`TYPE_PREFIXES`, docs/operating.md "Events to enable") in the key's mode: the key
`schemas.route` picks (None: the bridge answers `ignored` and publishes nothing), the
contract's headers, and `source: backfill`. Stripe names the connected account in an
event only on a Connect webhook (https://docs.stripe.com/api/events/object, `account`);
read with `Stripe-Account`, the event gets it here, so that the relay acts on that
account as for any Connect event.
"""

from __future__ import annotations

import time
from datetime import datetime, timedelta
from typing import Any

import orjson

from intentflow.consumer.stripe_reader import StripeReader
from intentflow.schemas import contract_headers, encode_key, route
from intentflow.schemas.contract import HEADER_SOURCE, SOURCE_BACKFILL

# A record as consumer/kafka_producer.py sends it: (value, key, headers).
Record = tuple[bytes, bytes, list[tuple[str, bytes]]]

# What the endpoint is asked to send (docs/operating.md, "Events to enable"): the
# events of other types are not the bridge's to publish.
TYPE_PREFIXES = (
    "payment_intent.",
    "charge.",  # its disputes (charge.dispute.*) and charge.refund.updated included
    "refund.",
    "checkout.session.",
    "review.",
    "radar.early_fraud_warning.",
)


def enabled(event_type: str) -> bool:
    return event_type.startswith(TYPE_PREFIXES)


def slices(start: datetime, until: datetime, width: timedelta) -> list[tuple[int, int]]:
    """[start, until) in slices of `width`, as Stripe's whole seconds: [gte, lt)."""
    edges, at = [], int(start.timestamp())
    end = int(until.timestamp())
    step = max(1, int(width.total_seconds()))
    while at < end:
        edges.append((at, min(at + step, end)))
        at += step
    return edges


async def read_slice(
    reader: StripeReader, account: str | None, gte: int, lt: int
) -> list[dict[str, Any]]:
    """Every event created in [gte, lt), oldest first.

    One listing for all types rather than one per wildcard: a slice costs one request
    per hundred events, not one per group even when empty.
    """
    listed: list[dict[str, Any]] = []
    async for page in reader.pages("events", {"created": {"gte": gte, "lt": lt}}, account):
        listed.extend(page)
    listed.reverse()  # Stripe lists newest first
    # Stable: within one second, the order Stripe gave.
    return sorted(listed, key=lambda event: int(event.get("created") or 0))


def record(event: dict[str, Any], account: str | None, livemode: bool) -> Record | None:
    """The event as the bridge would publish it; None: the bridge would not (another mode
    than the key's, a type the endpoint is not asked to send, about no payment)."""
    if event.get("livemode") is not livemode or not enabled(str(event.get("type"))):
        return None
    if account is not None and not event.get("account"):
        event["account"] = account
    where = route(event)
    if where is None:
        return None
    headers = contract_headers(event["id"], event["type"], time.time_ns() // 1_000_000)
    headers.append((HEADER_SOURCE, SOURCE_BACKFILL.encode()))
    return orjson.dumps(event), encode_key(where[0]), headers

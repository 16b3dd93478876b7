"""stripekit's events are Stripe's shapes: every field they send is a field of Stripe's
object, with the type Stripe gives it.

stripekit builds the objects the demo, the harness and the benchmarks send, by hand: it is
product code and must not read tests/. This holds each one to Stripe's own descriptions of
the object: its example in fixtures3.json (tests/fixtures/), whose value's JSON type must
be the one sent wherever the example shows one, and stripe-python 16's types (generated
from the same OpenAPI spec), which also name the fields the example leaves out and the type
of those it shows as null or empty.
"""

from __future__ import annotations

import types
import typing
from collections.abc import Iterator
from decimal import Decimal
from typing import Any, ForwardRef, Literal, Union

import pytest
import stripe
from stripe._stripe_object import StripeObject, UntypedStripeObject

from intentflow.stripekit import events
from tests.fixtures import stripe as fixtures

# Stripe's class for each kind stripekit builds.
CLASSES: dict[str, type[StripeObject]] = {
    "event": stripe.Event,
    "payment_intent": stripe.PaymentIntent,
    "charge": stripe.Charge,
    "dispute": stripe.Dispute,
    "refund": stripe.Refund,
    "checkout.session": stripe.checkout.Session,
}


# The JSON types each Python type of stripe-python's stands for.
SCALARS: dict[Any, tuple[str, ...]] = {
    bool: ("boolean",),
    int: ("integer",),
    float: ("number", "integer"),
    str: ("string",),
    Decimal: ("string",),  # Stripe's decimal_string (an exchange rate): sent as a string
}


def json_type(value: Any) -> str:
    names = {bool: "boolean", int: "integer", float: "number", str: "string"}
    return names.get(type(value)) or ("array" if isinstance(value, list) else "object")


def fields_of(cls: type) -> dict[str, Any]:
    """A StripeObject class's fields and their types, its bases' included."""
    found: dict[str, Any] = {}
    for klass in reversed(cls.__mro__):
        if klass is not StripeObject and issubclass(klass, StripeObject):
            found.update(vars(klass).get("__annotations__", {}))
    return {name: hint for name, hint in found.items() if not name.startswith("_")}


def problems(sent: Any, example: Any, hint: Any, path: str) -> Iterator[str]:
    """What in `sent` is not Stripe's: against the example where it shows a value, and
    against stripe-python's type `hint`."""
    if sent is not None and example is not None and json_type(sent) != json_type(example):
        yield f"{path}: {json_type(sent)}, Stripe's example has {json_type(example)}"
        return
    yield from _against_type(sent, example, hint, path)


def _against_type(sent: Any, example: Any, hint: Any, path: str) -> Iterator[str]:
    if hint is Any:
        return
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (Union, types.UnionType):
        yield from _union_problems(sent, example, args, path)
    elif sent is None:
        yield f"{path}: null, Stripe's type is {hint} (not nullable)"
    elif origin is Literal:
        if sent not in args:
            yield f"{path}: {sent!r}, Stripe's values are {args}"
    elif isinstance(hint, ForwardRef | str):
        # An expandable field, expanded: an object of another resource, not looked into.
        yield from _map_problems(sent, Any, path)
    elif origin is list:
        yield from _list_problems(sent, args[0], path)
    elif origin is dict or origin is UntypedStripeObject:
        yield from _map_problems(sent, args[-1] if args else Any, path)
    elif _is_stripe_object(hint) or _is_stripe_object(origin):  # ListObject[Refund] too
        yield from _object_problems(sent, example, origin or hint, path)
    elif hint in SCALARS:
        if json_type(sent) not in SCALARS[hint]:
            yield f"{path}: {json_type(sent)}, Stripe's type is {hint.__name__}"
    else:
        raise AssertionError(f"{path}: a type this check does not know: {hint!r}")


def _is_stripe_object(hint: Any) -> bool:
    return isinstance(hint, type) and issubclass(hint, StripeObject)


def _union_problems(sent: Any, example: Any, options: tuple[Any, ...], path: str) -> Iterator[str]:
    if sent is None:
        if type(None) not in options:
            yield f"{path}: null, Stripe's type is one of {options} (not nullable)"
        return
    found = [list(_against_type(sent, example, o, path)) for o in options if o is not type(None)]
    if all(found):
        yield min(found, key=len)[0]


def _list_problems(sent: Any, item: Any, path: str) -> Iterator[str]:
    if not isinstance(sent, list):
        yield f"{path}: {json_type(sent)}, Stripe's type is a list"
        return
    for i, value in enumerate(sent):
        yield from problems(value, None, item, f"{path}[{i}]")


def _map_problems(sent: Any, value_type: Any, path: str) -> Iterator[str]:
    """A free map (metadata, previous_attributes): any key, values of one type."""
    if not isinstance(sent, dict):
        yield f"{path}: {json_type(sent)}, Stripe's type is a map"
        return
    for key, value in sent.items():
        yield from problems(value, None, value_type, f"{path}.{key}")


def _object_problems(sent: Any, example: Any, cls: type, path: str) -> Iterator[str]:
    if not isinstance(sent, dict):
        yield f"{path}: {json_type(sent)}, Stripe's type is {cls.__qualname__}"
        return
    fields = fields_of(cls)
    shown = example if isinstance(example, dict) else {}
    for key, value in sent.items():
        if key not in fields and key not in shown:
            yield f"{path}.{key}: no such field on Stripe's {cls.__qualname__}"
            continue
        yield from problems(value, shown.get(key), fields.get(key, Any), f"{path}.{key}")


def stripe_problems(obj: dict[str, Any], kind: str) -> list[str]:
    return list(problems(obj, fixtures.resource(kind), CLASSES[kind], kind))


def sent_by_stripekit() -> list[tuple[str, dict[str, Any]]]:
    """Every object stripekit's builders make, by kind, the events' envelopes included."""
    made = [
        events.payment_intent("pi_x", amount=1999, status=status, cart_id="cart_1")
        for status in events.EVENT_TYPE_OF_STATUS
    ]
    made.append(events.payment_intent("pi_x", amount=1999, cart_id=None))
    made.append(events.charge_object("pi_x", amount=1999, captured=False))
    made += [
        events.checkout_session(
            "cs_x", intent_id="pi_x", amount_subtotal=1999, amount_total=2396, shipping=490,
            discount=199, tax=106, payment_status="paid", client_reference_id="cart_1",
        ),
        events.checkout_session(
            "cs_x", intent_id=None, amount_subtotal=1999, amount_total=1999, status="expired",
            metadata={"cart_id": "cart_1"}, payment_method_types=("card", "sepa_debit"),
        ),
    ]  # fmt: skip
    envelopes = [
        events.intent_event("pi_x", amount=1999, cart_id="cart_1"),
        events.charge_event("pi_x", amount=1999),
        events.refund_event("pi_x", amount=1999, refunded=500),
        events.refunded_event("pi_x", amount=1999, amount_refunded=1999, created=2),
        events.expired_event("pi_x", amount=1999, created=3),
        events.dispute_event(
            "pi_x", amount=1999, status="needs_response", reason="fraudulent", created=1
        ),
    ]
    made += [evt["data"]["object"] for evt in envelopes]
    return [(obj["object"], obj) for obj in made] + [("event", evt) for evt in envelopes]


SENT = sent_by_stripekit()


@pytest.mark.parametrize(
    ("kind", "obj"), SENT, ids=[f"{kind}-{i}" for i, (kind, _) in enumerate(SENT)]
)
def test_every_field_stripekit_sends_is_stripes_with_stripes_type(
    kind: str, obj: dict[str, Any]
) -> None:
    assert stripe_problems(obj, kind) == []


def test_the_check_catches_a_field_stripe_lacks_and_a_type_it_does_not_give() -> None:
    intent = events.payment_intent("pi_x", amount=1999, cart_id="cart_1")
    intent["invoice"] = None  # removed from PaymentIntent in API 2025-03-31.basil
    intent["amount"] = "1999"
    intent["shipping"]["address"]["city"] = 10119
    assert stripe_problems(intent, "payment_intent") == [
        "payment_intent.amount: string, Stripe's example has integer",
        "payment_intent.shipping.address.city: integer, Stripe's type is str",
        "payment_intent.invoice: no such field on Stripe's PaymentIntent",
    ]


@pytest.mark.parametrize("kind", sorted(CLASSES))
def test_stripes_own_examples_pass_the_check(kind: str) -> None:
    """The check is no stricter than Stripe: its example of each kind has no problem."""
    assert stripe_problems(fixtures.resource(kind), kind) == []

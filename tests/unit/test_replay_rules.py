"""The harness's own logic, without services: scenarios, delivery plans, and the reckoning.

A harness that cannot see a failure proves nothing, so the reckoning is shown
finding each kind of wrong database: a duplicate order, an oversold SKU, an
order its history does not allow, and stock that does not add up.
"""

from __future__ import annotations

from collections import Counter

from intentflow.loadtest.delivery import plan
from intentflow.loadtest.verdict import (
    ALLOCATED,
    IntentRow,
    OrderRow,
    Refusals,
    reckon,
    refused_with_stock,
)
from intentflow.loadtest.workload import Amounts, CartSpec, Fate, History, Scenario, scenario
from intentflow.stripekit import events


def test_a_seed_repeats_its_scenario_and_every_history_runs_forward_in_time() -> None:
    first, again = scenario(200, seed=11), scenario(200, seed=11)
    assert [e["id"] for e in first.events] == [e["id"] for e in again.events]
    assert first.stock == again.stock
    assert [e["id"] for e in scenario(200, seed=12).events] != [e["id"] for e in first.events]
    for h in first.histories:
        created = [e["created"] for e in h.events]
        assert created == sorted(created), h.intent_id
        assert 1 <= len(h.cart.lines) <= 6
        assert h.events[0]["type"] == "payment_intent.created"
    fates = first.by_fate()
    assert set(fates) == set(Fate), fates  # every ending occurs at this size
    # Carts share SKUs, some repeat one, and stock is short of demand somewhere.
    skus = Counter(sku for h in first.histories for sku, _, _ in h.cart.lines)
    assert max(skus.values()) > 5
    assert any(len({s for s, _, _ in h.cart.lines}) < len(h.cart.lines) for h in first.histories)


def test_a_plan_sends_every_event_one_to_k_times_some_at_once_and_some_late() -> None:
    world = scenario(300, seed=3)
    the_plan = plan(world, duplicates=3, reorder=0.2, concurrent=0.5, seed=3)
    copies: Counter[str] = Counter()
    for send in the_plan.sends:
        copies[send.event_id] += send.copies
    assert set(copies) == {e["id"] for e in world.events}
    assert set(copies.values()) == {1, 2, 3}
    assert the_plan.deliveries == sum(copies.values())
    assert any(s.copies > 1 for s in the_plan.sends)  # concurrent copies
    assert 0.05 * the_plan.events < the_plan.out_of_order < 0.5 * the_plan.events

    in_order = plan(world, duplicates=1, reorder=0.0, seed=3)
    assert in_order.deliveries == in_order.events == len(world.events)
    assert in_order.out_of_order == 0


def _history(i: int, fate: Fate, sku: str, quantity: int) -> History:
    """A history whose events carry what the reckoning reads: statuses, refunds, reasons."""
    intent_id = f"pi_{i}"
    authorized = events.intent_event(intent_id, amount=100, cart_id=f"cart_{i}")
    tail = {
        Fate.CAPTURED: [
            events.intent_event(intent_id, amount=100, cart_id=f"cart_{i}", status="succeeded")
        ],
        Fate.CANCELED: [
            events.intent_event(intent_id, amount=100, cart_id=f"cart_{i}", status="canceled")
        ],
        Fate.HELD: [],
        Fate.ABANDONED: [],
    }[fate]
    for evt in tail:
        if fate is Fate.CANCELED:
            evt["data"]["object"]["cancellation_reason"] = "requested_by_customer"
    history = (
        [authorized, *tail]
        if fate is not Fate.ABANDONED
        else [events.intent_event(intent_id, amount=100, cart_id=None, status="requires_action")]
    )
    cart = CartSpec(f"cart_{i}", "usd", ((sku, quantity, 50),))
    return History(intent_id, cart, fate, tuple(history))


def _world() -> Scenario:
    return Scenario(
        stock={"a": 3, "b": 2},
        histories=[
            _history(1, Fate.CAPTURED, "a", 2),
            _history(2, Fate.HELD, "a", 2),
            _history(3, Fate.CANCELED, "b", 2),
            _history(4, Fate.ABANDONED, "b", 1),
        ],
        seed=0,
    )


INTENTS = {
    "pi_1": IntentRow("succeeded"),
    "pi_2": IntentRow("requires_capture"),
    "pi_3": IntentRow("canceled", "requested_by_customer"),
    "pi_4": IntentRow("requires_action"),
}


def test_the_reckoning_passes_a_database_that_the_histories_explain() -> None:
    orders = [
        OrderRow("pi_1", "placed", "placed"),
        OrderRow("pi_2", "out_of_stock", "out_of_stock"),  # a: 1 left, it asked for 2
        OrderRow("pi_3", "canceled", "placed", 0, "requested_by_customer"),  # took b, gave back
    ]
    books = reckon(orders, INTENTS, {"a": 1, "b": 2}, _world())
    assert books.orders_expected == {ALLOCATED: 2, "canceled": 1}
    assert books.orders_found == {"placed": 1, "out_of_stock": 1, "canceled": 1}
    assert (books.duplicate_orders, books.oversold_units) == (0, 0)
    assert (books.contradicted, books.skus_off) == ([], [])
    assert (books.stock_expected, books.stock_found) == (3, 3)


def test_the_reckoning_finds_duplicates_overselling_contradictions_and_lost_stock() -> None:
    orders = [
        OrderRow("pi_1", "placed", "placed"),
        OrderRow("pi_2", "placed", "placed"),  # 4 units of a, 3 in stock: 1 oversold
        OrderRow("pi_2", "placed", "placed"),  # and again: a duplicate, 2 more
        OrderRow("pi_3", "placed", "placed"),  # canceled in its history
        OrderRow("pi_4", "placed", "placed"),  # never authorized
    ]
    books = reckon(orders, INTENTS, {"a": 0, "b": 1}, _world())
    assert books.duplicate_orders == 1
    assert books.oversold_units == (2 + 2 + 2 - 3) + (2 + 1 - 2)
    assert sorted(c.split()[0] for c in books.contradicted) == ["pi_2", "pi_3", "pi_4"]
    assert set(books.skus_off) == {"a", "b"}


def test_the_reckoning_finds_an_intent_or_order_that_missed_an_event() -> None:
    orders = [
        OrderRow("pi_1", "placed", "placed"),
        OrderRow("pi_2", "out_of_stock", "out_of_stock"),
        OrderRow("pi_3", "canceled", "placed", 0, "abandoned"),  # the wrong reason
    ]
    intents = {**INTENTS, "pi_1": IntentRow("requires_capture")}  # the capture was dropped
    books = reckon(orders, intents, {"a": 1, "b": 2}, _world())
    assert sorted(c.split()[0] for c in books.contradicted) == ["pi_1", "pi_3"]


def test_the_reckoning_finds_an_order_refused_stock_that_was_there() -> None:
    orders = [
        OrderRow("pi_1", "out_of_stock", "out_of_stock"),  # a: 3 in stock, it asked for 2
        OrderRow("pi_2", "placed", "placed"),
        OrderRow("pi_3", "canceled", "placed", 0, "requested_by_customer"),
    ]
    books = reckon(orders, INTENTS, {"a": 1, "b": 2}, _world())
    assert books.contradicted == []  # a: 1 left now, fewer than the 2 it asked for
    books = reckon(orders, INTENTS, {"a": 3, "b": 2}, _world())
    assert books.contradicted == ["pi_1 (out_of_stock with stock there)"]


def test_a_refusal_is_wrong_only_if_its_batch_saw_enough_of_every_sku_it_named() -> None:
    histories = {h.intent_id: h for h in _world().histories}  # pi_2 wants 2 of a
    seed = (1.0, "s", 3)

    def refused(reason: str, *moves: tuple[float, str, int]) -> list[str]:
        refusals = Refusals([("pi_2", reason, "T", 5.0)], {"a": sorted([seed, *moves])})
        return refused_with_stock(refusals, histories)

    assert refused("short:a") != []  # it saw 3 and wanted 2
    assert refused("short:a", (2.0, "U", -2)) == []  # another batch took 2 before it
    assert refused("short:a", (5.0, "T", -2)) == []  # an earlier order of its own batch did
    assert refused("short:a", (9.0, "V", -3)) != []  # after it committed: no excuse
    assert refused("short:a", (4.0, "V", +5), (2.0, "U", -3)) != []  # given back before it
    assert refused("") != []  # a refusal that names nothing


def test_a_third_of_the_purchases_go_through_checkout_with_their_cart_on_the_session() -> None:
    """The session charges the items plus shipping and tax, less a discount, and the intent
    asks for that total; the cart rides on the session (client_reference_id or metadata)
    and on the intent only when the shop copied it; a delayed method settles days later."""
    world = scenario(600, seed=11)
    # Histories whose order keeps more than a plain amount: only Checkout's.
    through = [
        h for h in world.histories if h.amounts != Amounts(h.amounts.amount, h.amounts.amount)
    ]
    sessions = [
        (h, e) for h in world.histories for e in h.events if e["type"].startswith("checkout.")
    ]
    via_checkout = {h.intent_id for h, _ in sessions}
    assert 0.2 < len(via_checkout) / len(world.histories) < 0.4
    assert {h.intent_id for h in through} <= via_checkout  # some Checkout totals are plain
    for h, evt in sessions:
        session = evt["data"]["object"]
        details = session["total_details"]
        assert session["payment_intent"] == h.intent_id
        assert (
            session["amount_total"]
            == h.amounts.amount
            == (
                session["amount_subtotal"]
                + details["amount_shipping"]
                + details["amount_tax"]
                - details["amount_discount"]
            )
        )
        on_session = session["client_reference_id"] or session["metadata"].get("cart_id")
        assert on_session == h.cart.id
        if h.fate is not Fate.MISMATCH:
            assert session["amount_subtotal"] == h.cart.total
    named = [
        e["data"]["object"]["metadata"].get("cart_id")
        for h in world.histories
        if h.intent_id in via_checkout
        for e in h.events
        if e["type"] == "payment_intent.created"
    ]
    assert None in named and any(named)  # copied onto the intent by some shops only
    by = Counter(
        "reference" if e["data"]["object"]["client_reference_id"] else "metadata"
        for _, e in sessions
    )
    assert by["reference"] and by["metadata"]
    assert any(h.amounts.shipping and h.amounts.tax and h.amounts.discount for h in through)

    settled = Counter(e["type"] for _, e in sessions if "async" in e["type"])
    assert settled["checkout.session.async_payment_succeeded"] > 0
    failed = [h for h in world.histories if h.fate is Fate.DELAYED_FAILED]
    assert failed and settled["checkout.session.async_payment_failed"] == len(failed)
    for h in failed:  # never authorized: no order, and it ends asking for a new method
        assert h.intent_status == "requires_payment_method"
        assert not {"payment_intent.amount_capturable_updated", "payment_intent.succeeded"} & {
            e["type"] for e in h.events
        }


def test_the_reckoning_finds_an_order_that_keeps_other_amounts_than_it_was_asked() -> None:
    """A Checkout order must keep the session's items, shipping, discount and tax, and the
    total the intent asked for; any other order its amount, as its subtotal too."""
    held = [h for h in scenario(300, seed=5).histories if h.fate is Fate.HELD]
    checkout = next(h for h in held if h.amounts.shipping)
    plain = next(h for h in held if h.amounts == Amounts(h.amounts.amount, h.amounts.amount))
    world = Scenario({}, [checkout, plain], 5)
    intents = {h.intent_id: IntentRow(h.intent_status) for h in world.histories}

    def judged(kept: Amounts, plain_kept: Amounts) -> list[str]:
        orders = [
            OrderRow(checkout.intent_id, "placed", "placed", amounts=kept),
            OrderRow(plain.intent_id, "placed", "placed", amounts=plain_kept),
        ]
        return reckon(orders, intents, {}, world).contradicted

    assert judged(checkout.amounts, plain.amounts) == []
    # The total taken for the items, as an order decided on the intent alone would keep it.
    wrong = Amounts(checkout.amounts.amount, checkout.amounts.amount)
    assert judged(wrong, plain.amounts) == [
        f"{checkout.intent_id} (held: keeps {tuple(wrong)}, not {tuple(checkout.amounts)})"
    ]
    assert [c.split()[0] for c in judged(checkout.amounts, plain.amounts._replace(tax=1))] == [
        plain.intent_id
    ]

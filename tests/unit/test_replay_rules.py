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
from intentflow.loadtest.workload import CartSpec, Fate, History, Scenario, scenario
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

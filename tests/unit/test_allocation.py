"""The pure order checks and stock allocation."""

from __future__ import annotations

from intentflow.consumer.allocation import Cart, CartLine, allocate, review_reason, skus_wanted
from intentflow.consumer.decisions import Allocation as OrderStatus
from intentflow.consumer.decisions import PlaceOrder
from intentflow.consumer.facts import Terms


def request(
    pi: str,
    cart_id: str,
    amount: int,
    currency: str = "usd",
    authorized: int | None = None,
) -> PlaceOrder:
    held = amount if authorized is None else authorized
    terms = Terms(cart_id, amount, currency, held, amount, currency)
    return PlaceOrder(pi, terms, f"evt_{pi}", (0, 0, 0, 0))


def cart(cart_id: str, *lines: tuple[str, int, int], currency: str = "usd") -> Cart:
    return Cart(cart_id, currency, tuple(CartLine(*line) for line in lines))


def test_placed_order_takes_its_demand() -> None:
    carts = {"c1": cart("c1", ("a", 2, 100), ("b", 1, 50))}
    plans, left = allocate([request("pi_1", "c1", 250)], carts, {"a": 5, "b": 1})
    assert plans[0].status is OrderStatus.PLACED
    assert dict(plans[0].taken) == {"a": 2, "b": 1}
    assert left == {"a": 3, "b": 0}


def test_two_lines_of_one_sku_are_one_demand() -> None:
    carts = {"c1": cart("c1", ("a", 2, 100), ("a", 2, 100))}
    plans, left = allocate([request("pi_1", "c1", 400)], carts, {"a": 3})
    assert plans[0].status is OrderStatus.OUT_OF_STOCK
    assert plans[0].reason == "short:a"
    assert left == {"a": 3}


def test_short_order_takes_nothing_even_of_skus_in_stock() -> None:
    carts = {"c1": cart("c1", ("a", 1, 100), ("b", 5, 100))}
    plans, left = allocate([request("pi_1", "c1", 600)], carts, {"a": 1, "b": 4})
    assert plans[0].status is OrderStatus.OUT_OF_STOCK
    assert plans[0].taken == {}
    assert left == {"a": 1, "b": 4}


def test_orders_are_served_in_the_given_order_until_stock_runs_out() -> None:
    carts = {f"c{i}": cart(f"c{i}", ("a", 1, 100)) for i in range(5)}
    reqs = [request(f"pi_{i}", f"c{i}", 100) for i in range(5)]
    plans, left = allocate(reqs, carts, {"a": 3})
    assert [p.status for p in plans] == [OrderStatus.PLACED] * 3 + [OrderStatus.OUT_OF_STOCK] * 2
    assert left == {"a": 0}


def test_a_sku_with_no_stock_row_has_no_stock() -> None:
    plans, _ = allocate([request("pi_1", "c1", 100)], {"c1": cart("c1", ("zz", 1, 100))}, {})
    assert plans[0].status is OrderStatus.OUT_OF_STOCK


def test_a_smaller_later_order_can_still_fit_after_a_large_one_is_refused() -> None:
    carts = {"big": cart("big", ("a", 5, 1)), "small": cart("small", ("a", 1, 1))}
    plans, left = allocate([request("p1", "big", 5), request("p2", "small", 1)], carts, {"a": 2})
    assert [p.status for p in plans] == [OrderStatus.OUT_OF_STOCK, OrderStatus.PLACED]
    assert left == {"a": 1}


def test_review_reasons() -> None:
    good = cart("c1", ("a", 2, 100))
    assert review_reason(request("p", "c1", 200).terms, good) is None
    assert review_reason(request("p", "c1", 200, "USD").terms, good) is None
    assert review_reason(request("p", "c1", 200).terms, None) == "cart_missing"
    assert review_reason(request("p", "c1", 0).terms, cart("c1")) == "cart_empty"
    assert review_reason(request("p", "c1", 199).terms, good) == "amount_mismatch"
    assert review_reason(request("p", "c1", 200, "eur").terms, good) == "currency_mismatch"


def test_needs_review_orders_take_no_stock_and_lock_no_rows() -> None:
    carts = {"c1": cart("c1", ("a", 1, 100)), "c2": cart("c2", ("b", 1, 100))}
    reqs = [request("p1", "c1", 999), request("p2", "c2", 100)]
    plans, left = allocate(reqs, carts, {"a": 1, "b": 1})
    assert [p.status for p in plans] == [OrderStatus.NEEDS_REVIEW, OrderStatus.PLACED]
    assert left == {"a": 1, "b": 0}
    assert skus_wanted(reqs, carts) == ["b"]


def test_skus_wanted_is_sorted_for_the_global_lock_order() -> None:
    carts = {"c1": cart("c1", ("z", 1, 1), ("a", 1, 1), ("m", 1, 1))}
    assert skus_wanted([request("p", "c1", 3)], carts) == ["a", "m", "z"]


def test_a_partial_authorization_is_reviewed_not_placed() -> None:
    carts = {"c1": cart("c1", ("a", 1, 1000))}
    short = request("pi_1", "c1", 1000, authorized=999)
    assert review_reason(short.terms, carts["c1"]) == "authorization_short"
    plans, left = allocate([short], carts, {"a": 5})
    assert (plans[0].status, plans[0].reason, left) == (
        OrderStatus.NEEDS_REVIEW,
        "authorization_short",
        {"a": 5},
    )


def test_an_authorization_of_more_than_the_cart_is_placed() -> None:
    carts = {"c1": cart("c1", ("a", 1, 1000))}
    assert review_reason(request("pi_1", "c1", 1000, authorized=1200).terms, carts["c1"]) is None


# --- One live order per cart -----------------------------------------------------------


def test_a_second_payment_for_a_held_cart_is_a_duplicate_and_takes_nothing() -> None:
    carts = {"c1": cart("c1", ("a", 1, 100))}
    plans, left = allocate([request("pi_2", "c1", 100)], carts, {"a": 5}, {"c1": "pi_1"})
    assert (plans[0].status, plans[0].reason, dict(plans[0].taken)) == (
        OrderStatus.DUPLICATE,
        "duplicate_of:pi_1",
        {},
    )
    assert left == {"a": 5}


def test_within_one_batch_the_first_paid_holds_the_cart() -> None:
    carts = {"c1": cart("c1", ("a", 1, 100))}
    plans, left = allocate(
        [request("pi_1", "c1", 100), request("pi_2", "c1", 100)], carts, {"a": 5}
    )
    assert [p.status for p in plans] == [OrderStatus.PLACED, OrderStatus.DUPLICATE]
    assert plans[1].reason == "duplicate_of:pi_1"
    assert left == {"a": 4}  # stock taken once


def test_a_needs_review_order_holds_its_cart_too() -> None:
    carts = {"c1": cart("c1", ("a", 1, 100))}
    plans, _ = allocate([request("pi_1", "c1", 999), request("pi_2", "c1", 100)], carts, {"a": 5})
    assert [p.status for p in plans] == [OrderStatus.NEEDS_REVIEW, OrderStatus.DUPLICATE]


def test_an_out_of_stock_order_does_not_hold_its_cart() -> None:
    """It took nothing and its money goes back: a later payment for the cart may take stock."""
    carts = {"c1": cart("c1", ("a", 2, 100))}
    plans, _ = allocate([request("pi_1", "c1", 200), request("pi_2", "c1", 200)], carts, {"a": 1})
    assert [p.status for p in plans] == [OrderStatus.OUT_OF_STOCK, OrderStatus.OUT_OF_STOCK]


def test_the_duplicate_check_comes_before_the_cart_check() -> None:
    """A second payment of the wrong amount for a held cart is a duplicate, not for review."""
    carts = {"c1": cart("c1", ("a", 1, 100))}
    plans, _ = allocate([request("pi_2", "c1", 999)], carts, {"a": 5}, {"c1": "pi_1"})
    assert plans[0].status is OrderStatus.DUPLICATE

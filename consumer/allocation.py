"""Decide what each new order becomes: checked against its cart, then given stock.

Pure code: no I/O. Orders are allocated in the order given (the store gives them
in the order their payments were authorized: first paid, first served); an
order whose summed demand per SKU does not fit the stock left gets
`out_of_stock` and takes nothing (invariant 3). Two lines of one SKU are one
demand. An order is trusted as paid for only when its cart exists and matches
the order's terms (consumer/facts.py: the Checkout Session's subtotal, else the
intent's amount, in the cart's currency), and what is held covers what the
buyer was asked to pay. A cart has one
live (`placed` or `needs_review`) order: a second payment for it is a
`duplicate`, checked first, and takes nothing.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from intentflow.consumer.decisions import Allocation, PlaceOrder, ReviewOrder
from intentflow.consumer.facts import Terms


@dataclass(frozen=True, slots=True)
class CartLine:
    sku: str
    quantity: int
    unit_amount: int


@dataclass(frozen=True, slots=True)
class Cart:
    id: str
    currency: str
    lines: tuple[CartLine, ...]

    @property
    def total(self) -> int:
        return sum(line.quantity * line.unit_amount for line in self.lines)

    def demand(self) -> dict[str, int]:
        """Units wanted per SKU, lines of one SKU summed."""
        summed: Counter[str] = Counter()
        for line in self.lines:
            summed[line.sku] += line.quantity
        return dict(summed)


@dataclass(frozen=True, slots=True)
class OrderPlan:
    request: Request
    cart: Cart | None
    status: Allocation
    reason: str | None
    taken: Mapping[str, int]  # units taken from stock per SKU; empty unless placed


def review_reason(terms: Terms, cart: Cart | None) -> str | None:
    """Why an order cannot be trusted as paid for, or None when it can."""
    if cart is None:
        return "cart_missing"
    if not cart.lines:
        return "cart_empty"
    if cart.currency.lower() != terms.cart_currency.lower():
        return "currency_mismatch"
    if cart.total != terms.cart_amount:
        return "amount_mismatch"
    if terms.authorized < terms.amount:
        return "authorization_short"  # a partial authorization
    return None


# A new order, or one waiting in needs_review decided again on new terms.
Request = PlaceOrder | ReviewOrder


def skus_wanted(requests: Iterable[Request], carts: Mapping[str, Cart]) -> list[str]:
    """Every SKU the orders may take stock of, sorted: the global lock order (invariant 8)."""
    skus: set[str] = set()
    for request in requests:
        cart = carts.get(request.cart_id)
        if cart is not None and review_reason(request.terms, cart) is None:
            skus.update(line.sku for line in cart.lines)
    return sorted(skus)


# What a live order holds its cart with: one per cart (orders_one_live_order_per_cart_idx).
LIVE = frozenset({Allocation.PLACED, Allocation.NEEDS_REVIEW})
# What cannot be filled: its money goes back (consumer/outbox.py, `stripe_actions_for`).
UNFILLABLE = frozenset({Allocation.OUT_OF_STOCK, Allocation.DUPLICATE})


def allocate(
    requests: Iterable[Request],
    carts: Mapping[str, Cart],
    stock: Mapping[str, int],
    holders: Mapping[str, str] | None = None,
) -> tuple[list[OrderPlan], dict[str, int]]:
    """Plan every order in the given order; return the plans and the stock left.

    A SKU missing from `stock` has none. `holders` names, per cart, the payment
    intent whose live order holds it already: an order for a held cart is a
    `duplicate` (no stock; its money goes back), and the first live order
    planned for a cart holds it for the orders after it (an order decided again
    holds its own cart already).
    """
    left = dict(stock)
    held = dict(holders or {})
    plans = []
    for request in requests:
        cart = carts.get(request.cart_id)
        holder = held.get(request.cart_id)
        if holder is not None and holder != request.payment_intent_id:
            reason = f"duplicate_of:{holder}"
            plans.append(OrderPlan(request, cart, Allocation.DUPLICATE, reason, {}))
            continue
        plan = _plan(request, cart, left)
        if plan.status in LIVE:
            held[request.cart_id] = request.payment_intent_id
        plans.append(plan)
    return plans, left


def _plan(request: Request, cart: Cart | None, left: dict[str, int]) -> OrderPlan:
    """Check one order against its cart, then give it stock from `left` (changed in place)."""
    reason = review_reason(request.terms, cart)
    if reason is not None:
        return OrderPlan(request, cart, Allocation.NEEDS_REVIEW, reason, {})
    assert cart is not None
    demand = cart.demand()
    short = sorted(sku for sku, qty in demand.items() if left.get(sku, 0) < qty)
    if short:
        return OrderPlan(request, cart, Allocation.OUT_OF_STOCK, "short:" + ",".join(short), {})
    for sku, qty in demand.items():
        left[sku] -= qty
    return OrderPlan(request, cart, Allocation.PLACED, None, demand)

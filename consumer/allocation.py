"""Decide what each new order becomes: checked against its cart, then given stock.

Pure code: no I/O. Orders are allocated in the order given (the store gives them
in the order their payments were authorized: first paid, first served); an
order whose summed demand per SKU does not fit the stock left gets
`out_of_stock` and takes nothing (invariant 3). Two lines of one SKU are one
demand. An order is trusted as paid for only when its cart exists, matches the
intent's amount and currency, and the authorization covers it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from intentflow.consumer.decisions import Allocation, PlaceOrder


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
    request: PlaceOrder
    cart: Cart | None
    status: Allocation
    reason: str | None
    taken: Mapping[str, int]  # units taken from stock per SKU; empty unless placed


def review_reason(request: PlaceOrder, cart: Cart | None) -> str | None:
    """Why an order cannot be trusted as paid for, or None when it can."""
    if request.cart_id is None:
        return "no_cart_id"
    if cart is None:
        return "cart_missing"
    if not cart.lines:
        return "cart_empty"
    if cart.currency.lower() != request.currency.lower():
        return "currency_mismatch"
    if cart.total != request.amount:
        return "amount_mismatch"
    if request.amount_authorized < cart.total:
        return "authorization_short"  # a partial authorization
    return None


def skus_wanted(requests: Iterable[PlaceOrder], carts: Mapping[str, Cart]) -> list[str]:
    """Every SKU the orders may take stock of, sorted: the global lock order (invariant 8)."""
    skus: set[str] = set()
    for request in requests:
        cart = carts.get(request.cart_id) if request.cart_id else None
        if cart is not None and review_reason(request, cart) is None:
            skus.update(line.sku for line in cart.lines)
    return sorted(skus)


def allocate(
    requests: Iterable[PlaceOrder], carts: Mapping[str, Cart], stock: Mapping[str, int]
) -> tuple[list[OrderPlan], dict[str, int]]:
    """Plan every order in the given order; return the plans and the stock left.

    A SKU missing from `stock` has none.
    """
    left = dict(stock)
    plans = []
    for request in requests:
        cart = carts.get(request.cart_id) if request.cart_id else None
        reason = review_reason(request, cart)
        if reason is not None:
            plans.append(OrderPlan(request, cart, Allocation.NEEDS_REVIEW, reason, {}))
            continue
        assert cart is not None
        demand = cart.demand()
        short = sorted(sku for sku, qty in demand.items() if left.get(sku, 0) < qty)
        if short:
            reason = "short:" + ",".join(short)
            plans.append(OrderPlan(request, cart, Allocation.OUT_OF_STOCK, reason, {}))
            continue
        for sku, qty in demand.items():
            left[sku] -= qty
        plans.append(OrderPlan(request, cart, Allocation.PLACED, None, demand))
    return plans, left

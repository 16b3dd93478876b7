"""The verdict of a replay: the database's books set against what the histories imply.

Pure: `loadtest.readback` reads the books, this judges them. What the
histories imply, intent by intent (`loadtest.workload.Fate`): which intents
have an order and in which status (placed or out_of_stock where the stock
decided, canceled, refunded, needs_review), the intent's final status and
cancellation reason, the order's refunded amount and what it keeps of what
was asked (the amount; through Checkout also the items, shipping, discount
and tax), and so how many units each SKU must have left: its stock less the
cart lines of every order that was placed and still holds its stock.
Allocation between intents that compete for the last units depends on
arrival, so which of them got stock is the database's decision, taken as
given; a refusal is checked against what its batch could have seen
(`refused_with_stock`). Everything else is predicted.

The checks: caught up, no acknowledged event lost, one order per intent, no
SKU selling more than it had, every intent and order as its history allows,
every SKU's stock explained, nothing ignored or dead-lettered, nothing given
up, no consumer crashed, every fault survived, `order-consumer reconcile`
clean. Latency quantiles and the per-second timeline are computed here too.
"""

from __future__ import annotations

import statistics
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import NamedTuple

from intentflow.loadtest.delivery import Tally
from intentflow.loadtest.report import Check, Second
from intentflow.loadtest.workload import Amounts, History, Scenario

ALLOCATED = "placed|out_of_stock"


@dataclass
class Applied:
    """Every event in the consumer's inbox, with when it arrived and when it committed."""

    ids: set[str] = field(default_factory=set)
    records: int = 0  # records on the topic: every delivery the bridge published
    ignored: int = 0  # events the consumer recorded as meaning nothing (none should be)
    # (received-at, committed) in epoch seconds, one per applied event whose record was found.
    times: list[tuple[float, float]] = field(default_factory=list)
    source: str = "commit timestamp"


@dataclass
class Books:
    """The database's orders and stock, read back and set against the histories."""

    orders_expected: dict[str, int]
    orders_found: dict[str, int]
    duplicate_orders: int
    oversold_units: int
    stock_expected: int
    stock_found: int
    skus_off: list[str]  # SKUs whose stock is not what the histories imply
    contradicted: list[str]  # intents whose orders their history does not allow


class OrderRow(NamedTuple):
    payment_intent_id: str
    status: str
    allocation: str
    amount_refunded: int = 0
    cancellation_reason: str | None = None
    # None: a row made by hand to judge something else (the readback always reads them).
    amounts: Amounts | None = None


class IntentRow(NamedTuple):
    status: str
    cancellation_reason: str | None = None


def reckon(
    orders: list[OrderRow],
    intents: dict[str, IntentRow],
    levels: dict[str, int],
    scenario: Scenario,
    refusals: Refusals | None = None,
) -> Books:
    """The database's orders, intents and stock levels set against what the histories imply."""
    histories = {h.intent_id: h for h in scenario.histories}
    by_intent: dict[str, list[OrderRow]] = defaultdict(list)
    for row in orders:
        by_intent[row.payment_intent_id].append(row)

    expected: Counter[str] = Counter()
    for h in scenario.histories:
        statuses = h.fate.statuses()
        if statuses:
            expected[ALLOCATED if len(statuses) > 1 else next(iter(statuses))] += 1
    found = Counter(r.status for r in orders)

    contradicted = [
        f"{intent_id} ({h.fate}: {problem})"
        for intent_id, h in histories.items()
        if (problem := _against_history(h, by_intent.get(intent_id, []), intents.get(intent_id)))
    ]
    contradicted += [f"{i} (no such intent)" for i in by_intent if i not in histories]
    if refusals is not None:
        contradicted += refused_with_stock(refusals, histories)
    else:
        contradicted += _needlessly_short(orders, histories, levels)

    held_now, held_expected = _held(by_intent, histories)
    oversold = sum(max(0, held_now[sku] - initial) for sku, initial in scenario.stock.items())
    oversold += sum(max(0, -level) for level in levels.values())
    left_expected = {sku: q - held_expected[sku] for sku, q in scenario.stock.items()}
    skus_off = [sku for sku, q in left_expected.items() if levels.get(sku) != q]
    return Books(
        orders_expected=dict(expected),
        orders_found=dict(found),
        duplicate_orders=len(orders) - len(by_intent),
        oversold_units=oversold,
        stock_expected=sum(left_expected.values()),
        stock_found=sum(levels.get(sku, 0) for sku in scenario.stock),
        skus_off=skus_off,
        contradicted=contradicted,
    )


def _against_history(h: History, rows: list[OrderRow], intent: IntentRow | None) -> str:
    """What in the database contradicts this intent's history; "" when nothing does."""
    allowed = h.fate.statuses()
    if intent is None:
        return "no payment_intents row"
    if (intent.status, intent.cancellation_reason) != (h.intent_status, h.cancellation_reason):
        return f"intent {intent.status}/{intent.cancellation_reason}"
    if not allowed:
        return f"{len(rows)} orders" if rows else ""
    if len(rows) != 1:
        return f"{len(rows)} orders"
    (order,) = rows
    if order.status not in allowed:
        return f"order {order.status}"
    if order.amount_refunded != h.amount_refunded:
        return f"refunded {order.amount_refunded}, not {h.amount_refunded}"
    if order.amounts is not None and order.amounts != h.amounts:
        return f"keeps {tuple(order.amounts)}, not {tuple(h.amounts)}"
    if order.status == "canceled" and order.cancellation_reason != h.cancellation_reason:
        return f"order canceled for {order.cancellation_reason}"
    return ""


@dataclass
class Refusals:
    """Every out_of_stock decision and every stock movement, each with its transaction."""

    # (intent, status_reason, transaction id, commit time) of each out_of_stock order
    orders: list[tuple[str, str, str, float]]
    # sku -> [(commit time, transaction id, delta)], in commit order
    movements: dict[str, list[tuple[float, str, int]]]


def refused_with_stock(refusals: Refusals, histories: dict[str, History]) -> list[str]:
    """out_of_stock orders whose transaction saw enough of every SKU it named short.

    A batch locks the stock rows of every SKU it wants (FOR UPDATE) until it
    commits, so what it saw of a SKU is the sum of that SKU's movements
    committed before it (the seed's included), less what its own earlier
    orders took. At least that sum less everything its orders took: if even
    that covers the cart's demand for each SKU the reason names, the order
    was refused stock that was there.
    """
    wrong = []
    for intent_id, reason, tx, committed in refusals.orders:
        h = histories.get(intent_id)
        if h is None:
            continue
        demand: Counter[str] = Counter()
        for sku, quantity, _ in h.cart.lines:
            demand[sku] += quantity
        named = [sku for sku in reason.removeprefix("short:").split(",") if sku]
        if not reason.startswith("short:") or not named:
            wrong.append(f"{intent_id} (out_of_stock, reason {reason!r} names no SKU)")
            continue
        seen = {
            sku: sum(
                delta
                for at, by, delta in refusals.movements.get(sku, ())
                if (at < committed and by != tx) or (by == tx and delta < 0)
            )
            for sku in named
        }
        if all(seen[sku] >= demand[sku] for sku in named):
            wrong.append(f"{intent_id} (out_of_stock, saw {seen} for {dict(demand)})")
    return wrong


def _needlessly_short(
    orders: list[OrderRow], histories: dict[str, History], levels: dict[str, int]
) -> list[str]:
    """Without commit timestamps, a weaker test: out_of_stock orders whose every SKU still
    has what the cart asked for, on SKUs whose stock only ever fell (no canceled order
    gave any back): there was enough when they were allocated."""
    given_back = {
        sku
        for row in orders
        if row.allocation == "placed"
        and row.status == "canceled"
        and row.payment_intent_id in histories
        for sku, _, _ in histories[row.payment_intent_id].cart.lines
    }
    short = []
    for row in orders:
        h = histories.get(row.payment_intent_id)
        if row.allocation != "out_of_stock" or h is None:
            continue
        demand: Counter[str] = Counter()
        for sku, quantity, _ in h.cart.lines:
            demand[sku] += quantity
        if all(levels.get(sku, 0) >= n and sku not in given_back for sku, n in demand.items()):
            short.append(f"{row.payment_intent_id} (out_of_stock with stock there)")
    return short


def _held(
    by_intent: dict[str, list[OrderRow]], histories: dict[str, History]
) -> tuple[Counter[str], Counter[str]]:
    """Units per SKU held by placed orders: open in the database, and as the fates imply."""
    now: Counter[str] = Counter()
    expected: Counter[str] = Counter()
    for intent_id, rows in by_intent.items():
        h = histories.get(intent_id)
        if h is None:
            continue
        for row in rows:
            if row.allocation != "placed":
                continue
            for sku, quantity, _ in h.cart.lines:
                if row.status != "canceled":
                    now[sku] += quantity
                if h.fate.keeps_stock:
                    expected[sku] += quantity
    return now, expected


def checks(
    books: Books,
    *,
    lost: int,
    dead_letters: int,
    reconciled: tuple[bool, str],
    dead_consumers: list[int],
    caught_up: bool,
    given_up: int,
    ignored: int,
    faults_not_survived: list[str],
) -> list[Check]:
    def count(name: str, found: int, detail: str = "") -> Check:
        return Check(name, "0", f"{found}{' — ' + detail if detail and found else ''}", found == 0)

    return [
        Check("caught up: every acknowledged event applied, every record committed", "yes",
              "yes" if caught_up else "no", caught_up),
        count("lost events", lost),
        count("duplicate orders", books.duplicate_orders),
        count("oversold units", books.oversold_units),
        count("orders against their history", len(books.contradicted),
              ", ".join(books.contradicted[:3])),
        count("SKUs with unexplained stock", len(books.skus_off),
              ", ".join(books.skus_off[:3])),
        count("events ignored as meaningless", ignored),
        count("dead-lettered events", dead_letters),
        count("deliveries given up", given_up),
        count("consumers that crashed", len(dead_consumers), str(dead_consumers)),
        count("faults not survived", len(faults_not_survived), ", ".join(faults_not_survived)),
        Check("order-consumer reconcile", "exit 0", reconciled[1] or "(no output)", reconciled[0]),
    ]  # fmt: skip


def quantiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {"p50": 0.0, "p95": 0.0, "p99": 0.0, "max": 0.0, "count": 0}
    ordered = sorted(values)

    def q(p: float) -> float:
        return ordered[min(len(ordered) - 1, int(p * len(ordered)))]

    return {
        "p50": q(0.5),
        "p95": q(0.95),
        "p99": q(0.99),
        "max": ordered[-1],
        "count": len(ordered),
    }


def timeline(tally: Tally, applied: Applied, started: float) -> list[Second]:
    per_second: dict[int, list[float]] = defaultdict(list)
    for received, committed in applied.times:
        per_second[int(committed - started)].append((committed - received) * 1000)
    last = max([*tally.acked_per_second, *per_second, 0])
    out = []
    for t in range(last + 1):
        lat = sorted(per_second.get(t, []))
        out.append(
            Second(
                t=t,
                acked=tally.acked_per_second.get(t, 0),
                applied=len(lat),
                latency_p99_ms=quantiles(lat)["p99"] if lat else None,
                latency_p50_ms=statistics.median(lat) if lat else None,
            )
        )
    return out


def percentile(values: list[float], q: float) -> float:
    """The `q`th percentile (0-100) of `values`, nearest rank; NaN when empty."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]

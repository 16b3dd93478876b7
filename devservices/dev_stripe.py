"""`dev-stripe` (`python -m intentflow.devservices.dev_stripe`): Stripe, played for `make dev`.

A first order without the Stripe CLI or an account: this acts as Stripe for a
cart that `seed-cart` (or `walk` itself) made, beside `make dev`. Each
subcommand but `walk` is one action of devservices/dev_stripe_actions.py's
`ACTIONS` on one payment intent; `walk` seeds a cart (unless given one) and
does `authorize`, then `capture` and `refund` (`--cancel`: `cancel`).

A step, in order: check that the intent's state allows the action (`after`);
build its events; sign each with STRIPE_WEBHOOK_SECRET and POST it to the
bridge (`Bridge.send`: a non-2xx answer stops here); print each event sent;
poll the order at DATABASE_URL until it shows the step (`Player.shown`, up to
WAIT_S); print the order.

`walk` keeps the intent's state in memory from step to step; `capture PI` and
the others read it back from what the consumer recorded of the intent
(`payment_intents`), the one memory the dev stack has.

Exit status: EXIT_OK when every step showed; EXIT_NOT_SHOWN when the order
did not show a step in time (or `walk` got no `placed` order to go on with);
EXIT_CANNOT when something must be fixed first (the database or the bridge
unreachable or refusing, an unknown cart or intent, an action the intent's
state does not allow), said in one line.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import secrets
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import asyncpg
import httpx

from intentflow.devservices import seed
from intentflow.devservices.dev_stripe_actions import (
    ACTIONS,
    WALKS,
    CannotPlay,
    Intent,
    Order,
    after,
)
from intentflow.producer.app import WEBHOOK_PATH
from intentflow.stripekit import events
from intentflow.stripekit.signing import stripe_signature

DEFAULT_BRIDGE_URL = f"http://127.0.0.1:8000{WEBHOOK_PATH}"  # make dev's, on its default port
# How long the order has to show a step; make dev's consumer shows one in under a second.
WAIT_S = 15.0
POLL_S = 0.1
BRIDGE_TIMEOUT_S = 10.0

EXIT_OK = 0
EXIT_NOT_SHOWN = 1
EXIT_CANNOT = 2


class NotShown(RuntimeError):
    """The order did not show a step; the message says what it shows instead."""


@dataclass(frozen=True)
class Environment:
    """What the command is given: read once, in `main`."""

    database_url: str
    secret: str  # the first of STRIPE_WEBHOOK_SECRET's, as the bridge checks any of them
    bridge_url: str

    @classmethod
    def read(cls, environ: Mapping[str, str], bridge_url: str | None) -> Environment:
        database_url = environ.get("DATABASE_URL", "").strip()
        secret = environ.get("STRIPE_WEBHOOK_SECRET", "").split(",")[0].strip()
        missing = [
            name
            for name, value in (("STRIPE_WEBHOOK_SECRET", secret), ("DATABASE_URL", database_url))
            if not value
        ]
        if missing:
            raise CannotPlay(
                f"set {' and '.join(missing)}: make dev prints the dev-stripe command with them"
            )
        url = bridge_url or environ.get("BRIDGE_URL", "").strip() or DEFAULT_BRIDGE_URL
        try:
            parsed = httpx.URL(url)
            usable = parsed.scheme in ("http", "https") and 0 < (parsed.port or 80) <= 65535
        except httpx.InvalidURL:
            usable = False
        if not usable:
            raise CannotPlay(
                f"{url} is no webhook URL: give the bridge's, such as {DEFAULT_BRIDGE_URL}"
            )
        return cls(database_url, secret, url)


# The bridge's refusals (its `outcome`), and what to do about each.
_FIXES = {
    "bad_signature": "give STRIPE_WEBHOOK_SECRET the secret the bridge checks "
    "(make dev prints the command with it)",
    "unavailable": "the bridge cannot reach Kafka: make dev's log says why",
    "rejected_by_broker": "the broker refused the event: make dev's log says why",
}


class Bridge:
    """The bridge's webhook endpoint, posted to as Stripe does: signed, one event a request."""

    def __init__(self, client: httpx.AsyncClient, url: str, secret: str) -> None:
        self._client, self.url, self._secret = client, url, secret

    async def send(self, evt: dict[str, Any]) -> None:
        body = events.encode(evt)
        headers = {
            "content-type": "application/json",
            "stripe-signature": stripe_signature(body, self._secret),
        }
        try:
            answer = await self._client.post(self.url, content=body, headers=headers)
        except (httpx.HTTPError, httpx.InvalidURL) as exc:
            raise CannotPlay(
                f"the bridge at {self.url} does not answer ({type(exc).__name__}: {exc}): "
                "start `make dev`, or give its webhook URL with --bridge-url or BRIDGE_URL"
            ) from exc
        try:
            said = answer.json()
        except ValueError:
            said = {}
        outcome = said.get("outcome", "") if isinstance(said, dict) else ""
        if answer.is_success and outcome != "other_mode":
            return
        if answer.status_code == 404:
            fix = f"nothing takes webhooks there: give the bridge's URL, ending in {WEBHOOK_PATH}"
        elif outcome == "other_mode":
            fix = "it takes live-mode events only: run it with STRIPE_LIVEMODE=false"
        else:
            fix = _FIXES.get(outcome, "the bridge's log says why")
        reason = said.get("reason") if isinstance(said, dict) else None
        answered = f"{answer.status_code} {outcome}".strip() + (f" ({reason})" if reason else "")
        raise CannotPlay(f"the bridge at {self.url} answered {answered}: {fix}")


_ORDER = """
SELECT status, amount, currency, amount_captured, amount_refunded, dispute_status,
       ARRAY(SELECT ARRAY[l.sku, l.stocked_quantity::text] FROM inventory_levels l
             WHERE l.sku IN (SELECT i.sku FROM cart_items i WHERE i.cart_id = o.cart_id)
             ORDER BY l.sku) AS stock
FROM orders o WHERE payment_intent_id = $1
"""
_CART = """
SELECT c.currency, sum(i.quantity * i.unit_amount)::bigint AS total
FROM carts c LEFT JOIN cart_items i ON i.cart_id = c.id WHERE c.id = $1 GROUP BY c.id
"""
# What the consumer recorded of the intent: Stripe's state as the events told it.
_INTENT = """
SELECT named_cart_id, auth_amount, auth_currency, paid_at, status,
       charge_amount_refunded, dispute_status, status_created
FROM payment_intents WHERE id = $1
"""


async def read_order(conn: asyncpg.Connection, intent_id: str) -> Order | None:
    row = await conn.fetchrow(_ORDER, intent_id)
    if row is None:
        return None
    return Order(
        status=row["status"],
        amount=row["amount"],
        currency=row["currency"],
        amount_captured=row["amount_captured"],
        amount_refunded=row["amount_refunded"],
        dispute_status=row["dispute_status"],
        stock=tuple((sku, int(level)) for sku, level in row["stock"]),
    )


async def read_intent(conn: asyncpg.Connection, intent_id: str) -> Intent:
    row = await conn.fetchrow(_INTENT, intent_id)
    if row is None or row["auth_amount"] is None:
        raise CannotPlay(
            f"no authorized intent {intent_id} at DATABASE_URL: "
            "authorize a cart first (dev-stripe authorize CART_ID)"
        )
    status = row["status"]
    return Intent(
        id=intent_id,
        cart_id=row["named_cart_id"],
        amount=row["auth_amount"],
        currency=row["auth_currency"],
        created=row["paid_at"],  # authorize sends the intent's creation in the same second
        status=status,
        amount_refunded=row["charge_amount_refunded"],
        dispute=row["dispute_status"],
        canceled_at=row["status_created"] if status == "canceled" else None,
    )


async def new_intent(conn: asyncpg.Connection, cart_id: str) -> Intent:
    """An intent for the cart's total, in its currency, as `seed-cart` tells Stripe to make."""
    row = await conn.fetchrow(_CART, cart_id)
    if row is None:
        raise CannotPlay(f"no cart {cart_id} at DATABASE_URL: make one with seed-cart, or walk")
    total = row["total"] or 0
    if not seed.STRIPE_MIN_AMOUNT <= total <= seed.STRIPE_MAX_AMOUNT:
        raise CannotPlay(
            f"cart {cart_id} totals {total}, which Stripe refuses as an amount "
            f"(from {seed.STRIPE_MIN_AMOUNT} to {seed.STRIPE_MAX_AMOUNT})"
        )
    return Intent.for_cart(cart_id, total, row["currency"], int(time.time()))


async def seed_walk_cart(conn: asyncpg.Connection) -> seed.SeededCart:
    """seed-cart's default cart; its SKU restocked to seed-cart's default if sold out."""
    level = await conn.fetchval(
        "SELECT stocked_quantity FROM inventory_levels WHERE sku = $1", seed.DEFAULT_SKU
    )
    return await seed.seed_cart(
        conn, cart_id=f"cart_{secrets.token_hex(4)}", sku=seed.DEFAULT_SKU, quantity=1,
        unit_amount=seed.DEFAULT_UNIT_AMOUNT, currency="usd",
        stock=seed.DEFAULT_STOCK if level is not None and level < 1 else None,
    )  # fmt: skip


def say(line: str) -> None:
    print(line, flush=True)


class Player:
    """Plays Stripe's actions against the bridge, and watches the order at DATABASE_URL."""

    def __init__(self, conn: asyncpg.Connection, bridge: Bridge) -> None:
        self._conn, self._bridge = conn, bridge

    async def step(self, name: str, intent: Intent) -> tuple[Intent, Order]:
        at = max(int(time.time()), intent.created)
        done = after(name, intent, at)
        for evt in ACTIONS[name].sends(intent, done, at):
            await self._bridge.send(evt)
            say(f"{name} {done.id}: sent {evt['type']} {evt['id']}")
        order = await self.shown(name, done)
        say(f"{name} {done.id}: {order.line()}")
        return done, order

    async def shown(self, name: str, intent: Intent) -> Order:
        """The order once it shows `name` done; NotShown after WAIT_S."""
        shows = ACTIONS[name].shows
        order = None
        deadline = time.monotonic() + WAIT_S
        while time.monotonic() < deadline:
            order = await read_order(self._conn, intent.id)
            if order is not None and shows(order, intent):
                return order
            await asyncio.sleep(POLL_S)
        now = "no order" if order is None else order.line()
        raise NotShown(
            f"{name} {intent.id}: the order did not show it within {WAIT_S:g} s ({now}): "
            "is make dev's consumer running? its log says why"
        )

    async def walk(self, cart_id: str | None, cancel: bool) -> None:
        if cart_id is None:
            cart = await seed_walk_cart(self._conn)
            say(
                f"seeded cart {cart.cart_id}: {cart.quantity} x {cart.sku} at {cart.unit_amount}"
                f" = {cart.total} {cart.currency}, stock of {cart.sku} {cart.level}"
            )
            cart_id = cart.cart_id
        intent, order = await self.step("authorize", await new_intent(self._conn, cart_id))
        if order.status != "placed":
            raise NotShown(
                f"walk stops: the order of {intent.id} is {order.status}, not placed "
                "(out_of_stock: give the SKU stock with seed-cart --stock)"
            )
        for name in WALKS[cancel]:
            intent, order = await self.step(name, intent)


async def run(env: Environment, args: argparse.Namespace) -> None:
    try:
        conn = await seed.connect(env.database_url)
    except seed.SeedError as exc:
        raise CannotPlay(str(exc)) from exc
    try:
        async with httpx.AsyncClient(timeout=BRIDGE_TIMEOUT_S) as client:
            player = Player(conn, Bridge(client, env.bridge_url, env.secret))
            if args.command == "walk":
                await player.walk(args.cart_id, args.cancel)
            elif ACTIONS[args.command].on_cart:
                await player.step(args.command, await new_intent(conn, args.target))
            else:
                await player.step(args.command, await read_intent(conn, args.target))
    except asyncpg.UndefinedTableError as exc:
        raise CannotPlay(seed.NO_TABLES) from exc
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        raise CannotPlay(
            f"PostgreSQL at DATABASE_URL failed ({type(exc).__name__}: {exc}): "
            "is make dev still running?"
        ) from exc
    finally:
        with contextlib.suppress(OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
            await conn.close(timeout=5)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dev-stripe",
        description="Act as Stripe for make dev: send the bridge the signed events of a "
        "payment intent, and show the order at DATABASE_URL after each step. Needs "
        "STRIPE_WEBHOOK_SECRET and DATABASE_URL (make dev prints the command with them).",
    )
    parser.add_argument(
        "--bridge-url",
        help=f"the bridge's webhook URL; default: BRIDGE_URL, else {DEFAULT_BRIDGE_URL}",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, action in ACTIONS.items():
        command = commands.add_parser(name, help=action.about, description=action.about)
        if action.on_cart:
            command.add_argument("target", metavar="CART_ID", help="a cart seed-cart made")
        else:
            command.add_argument("target", metavar="PI", help="the intent's id (pi_…)")
    walk = commands.add_parser(
        "walk",
        help="seed a cart (unless given one), authorize, capture, refund",
        description="Seed a cart unless given one, then authorize, capture and refund "
        "(--cancel: authorize and cancel).",
    )
    walk.add_argument("cart_id", metavar="CART_ID", nargs="?", help="default: a new cart")
    walk.add_argument("--cancel", action="store_true", help="cancel the authorization instead")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        env = Environment.read(os.environ, args.bridge_url)
        asyncio.run(run(env, args))
    except CannotPlay as exc:
        print(f"dev-stripe: {exc}", file=sys.stderr, flush=True)
        return EXIT_CANNOT
    except NotShown as exc:
        print(f"dev-stripe: {exc}", file=sys.stderr, flush=True)
        return EXIT_NOT_SHOWN
    except KeyboardInterrupt:
        return 130
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())

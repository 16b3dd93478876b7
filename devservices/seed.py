"""`seed-cart` (`python -m intentflow.devservices.seed`): a cart, its stock, and how to pay for it.

For local development beside `make dev`: one cart of one line (SKU, quantity,
unit price) in the database at DATABASE_URL, the SKU's stock, and the Stripe
CLI commands that pay for exactly that cart: the intent's `amount` and
`currency` are the cart's total and currency and `metadata[cart_id]` names it,
because the consumer places an order only when they match (anything else is
`needs_review`). Stripe sends the authorization as
`payment_intent.amount_capturable_updated` (manual capture) and that event
places the order; capturing or canceling it later goes through the same path.

Stock: a new SKU starts with DEFAULT_STOCK; an existing one keeps its level
unless `--stock` sets it. Either way the schema's trigger writes the movement.
Amounts are in the currency's smallest unit (cents for usd).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import secrets
import shlex
import sys
from dataclasses import dataclass

import asyncpg

DEFAULT_SKU = "dev-mug"
DEFAULT_STOCK = 10
DEFAULT_UNIT_AMOUNT = 2500
# Stripe's test card that authorizes without 3-D Secure.
TEST_PAYMENT_METHOD = "pm_card_visa"
# What Stripe accepts as a PaymentIntent's amount: at least its minimum charge (50
# in the smallest unit of usd, eur and most currencies; a few ask more) and at
# most eight digits. A total outside them prints a command Stripe refuses.
STRIPE_MIN_AMOUNT = 50
STRIPE_MAX_AMOUNT = 99_999_999
# The columns': cart_items.quantity and inventory_levels.stocked_quantity are integers.
INT4_MAX = 2**31 - 1


NO_TABLES = (
    "the database has no intentflow tables: run `order-consumer migrate` "
    "with this DATABASE_URL (make dev does it)"
)


class SeedError(RuntimeError):
    """What the developer must fix, in one line."""


@dataclass(frozen=True)
class SeededCart:
    cart_id: str
    sku: str
    quantity: int
    unit_amount: int
    currency: str
    level: int  # the SKU's stock after seeding
    level_before: int | None  # None: the SKU is new

    @property
    def total(self) -> int:
        return self.quantity * self.unit_amount


async def seed_cart(
    conn: asyncpg.Connection,
    *,
    cart_id: str,
    sku: str,
    quantity: int,
    unit_amount: int,
    currency: str,
    stock: int | None,
) -> SeededCart:
    """Create the cart and its one line, and the SKU's stock, in one transaction."""
    async with conn.transaction():
        before = await conn.fetchval(
            "SELECT stocked_quantity FROM inventory_levels WHERE sku = $1 FOR UPDATE", sku
        )
        level = stock if stock is not None else (DEFAULT_STOCK if before is None else before)
        await conn.execute(
            """INSERT INTO inventory_levels (sku, stocked_quantity) VALUES ($1, $2)
               ON CONFLICT (sku) DO UPDATE
               SET stocked_quantity = EXCLUDED.stocked_quantity, updated_at = now()
               WHERE inventory_levels.stocked_quantity <> EXCLUDED.stocked_quantity""",
            sku,
            level,
        )
        await conn.execute("INSERT INTO carts (id, currency) VALUES ($1, $2)", cart_id, currency)
        await conn.execute(
            "INSERT INTO cart_items (cart_id, sku, quantity, unit_amount) VALUES ($1, $2, $3, $4)",
            cart_id,
            sku,
            quantity,
            unit_amount,
        )
    return SeededCart(cart_id, sku, quantity, unit_amount, currency, level, before)


def create_command(cart: SeededCart) -> str:
    """`stripe payment_intents create`: authorize the cart's total, to capture later."""
    argv = [
        "stripe", "payment_intents", "create",
        "--amount", str(cart.total), "--currency", cart.currency,
        "--capture-method", "manual", "--confirm=true",
        "--payment-method", TEST_PAYMENT_METHOD, "-d", "payment_method_types[]=card",
        "-d", f"metadata[cart_id]={cart.cart_id}",
    ]  # fmt: skip
    return shlex.join(argv)


def trigger_command(cart: SeededCart) -> str:
    """`stripe trigger`: the CLI's own authorization fixture, its amount and metadata replaced."""
    argv = ["stripe", "trigger", "payment_intent.amount_capturable_updated"]
    for field, value in (
        ("amount", str(cart.total)),
        ("currency", cart.currency),
        ("metadata.cart_id", cart.cart_id),
    ):
        argv += ["--override", f"payment_intent:{field}={value}"]
    return shlex.join(argv)


def describe(cart: SeededCart) -> str:
    if cart.level_before is None:
        stock = f"{cart.level} (new SKU)"
    elif cart.level_before == cart.level:
        stock = f"{cart.level} (kept)"
    else:
        stock = f"{cart.level} (was {cart.level_before})"
    return "\n".join(
        [
            f"cart {cart.cart_id}: {cart.quantity} x {cart.sku} at {cart.unit_amount} "
            f"= {cart.total} {cart.currency}",
            f"stock of {cart.sku}: {stock}",
            "",
            "Pay for it with the Stripe CLI, `stripe listen` forwarding to make dev's bridge.",
            "  Authorize now, capture later (the order is placed on the authorization,",
            "  payment_intent.amount_capturable_updated):",
            f"    {create_command(cart)}",
            "  or the CLI's test event for the same authorization:",
            f"    {trigger_command(cart)}",
            "Then `stripe payment_intents capture pi_...` takes the money, or",
            "`stripe payment_intents cancel pi_...` releases it and returns the stock.",
        ]
    )


_CURRENCY = re.compile(r"^[a-z]{3}$")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="seed-cart",
        description="Create a cart and its stock in DATABASE_URL (make dev prints it), "
        "and print the Stripe CLI command that pays for it.",
    )
    parser.add_argument("--cart-id", help="default: cart_<random>")
    parser.add_argument("--sku", default=DEFAULT_SKU, help=f"default: {DEFAULT_SKU}")
    parser.add_argument("--quantity", type=int, default=1, help="default: 1")
    parser.add_argument(
        "--price",
        type=int,
        default=DEFAULT_UNIT_AMOUNT,
        help=f"unit price in the currency's smallest unit (cents); default: {DEFAULT_UNIT_AMOUNT}",
    )
    parser.add_argument("--currency", default="usd", help="ISO code, lower case; default: usd")
    parser.add_argument(
        "--stock",
        type=int,
        help=f"set the SKU's level to this; default: {DEFAULT_STOCK} for a new SKU, "
        "an existing one's level is kept",
    )
    return parser


def _check(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    if not 1 <= args.quantity <= INT4_MAX:
        parser.error(f"--quantity must be from 1 to {INT4_MAX}")
    if not 0 <= args.price <= STRIPE_MAX_AMOUNT:
        parser.error(f"--price must be from 0 to {STRIPE_MAX_AMOUNT}")
    if args.stock is not None and not 0 <= args.stock <= INT4_MAX:
        parser.error(f"--stock must be from 0 to {INT4_MAX}")
    total = args.quantity * args.price
    if not STRIPE_MIN_AMOUNT <= total <= STRIPE_MAX_AMOUNT:
        parser.error(
            f"the cart's total ({total}) must be from {STRIPE_MIN_AMOUNT} to "
            f"{STRIPE_MAX_AMOUNT}, what Stripe accepts as an amount: change --quantity or --price"
        )
    if not _CURRENCY.match(args.currency):
        parser.error("--currency must be a three-letter ISO code in lower case, such as usd")
    if args.cart_id is not None and not args.cart_id.strip():
        parser.error("--cart-id must not be empty")


async def connect(database_url: str) -> asyncpg.Connection:
    """A connection to DATABASE_URL, or SeedError saying in one line why not (`dev-stripe` too)."""
    try:
        return await asyncpg.connect(database_url, timeout=5)
    except (
        OSError, TimeoutError, ValueError, OverflowError,
        asyncpg.PostgresError, asyncpg.InterfaceError,
    ) as exc:  # fmt: skip
        raise SeedError(
            f"PostgreSQL at DATABASE_URL does not answer ({exc}): "
            "start `make dev` and use the DATABASE_URL it prints"
        ) from exc


async def _seed(database_url: str, args: argparse.Namespace) -> SeededCart:
    conn = await connect(database_url)
    try:
        return await seed_cart(
            conn,
            cart_id=args.cart_id or f"cart_{secrets.token_hex(4)}",
            sku=args.sku,
            quantity=args.quantity,
            unit_amount=args.price,
            currency=args.currency,
            stock=args.stock,
        )
    except asyncpg.UndefinedTableError as exc:
        raise SeedError(NO_TABLES) from exc
    except asyncpg.UniqueViolationError as exc:
        raise SeedError(f"cart {args.cart_id} exists already: choose another --cart-id") from exc
    finally:
        await conn.close()


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    _check(args, parser)
    database_url = os.environ.get("DATABASE_URL", "")
    if not database_url:
        print("seed-cart: set DATABASE_URL (make dev prints the one to use)", file=sys.stderr)
        return 2
    try:
        cart = asyncio.run(_seed(database_url, args))
    except SeedError as exc:
        print(f"seed-cart: {exc}", file=sys.stderr)
        return 2
    try:
        print(describe(cart), flush=True)
    except BrokenPipeError:  # `seed-cart | head`: the cart exists, the reader left
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


if __name__ == "__main__":
    sys.exit(main())

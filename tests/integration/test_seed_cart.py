"""`seed-cart` (devservices/seed.py) against a real, migrated database, run as a developer would."""

from __future__ import annotations

import secrets

import asyncpg

from intentflow.devservices import Services
from tests.dev_support import (
    overrides_of_trigger,
    payment_of_create,
    printed_command,
    run_seed_cart,
)


async def test_seed_cart_creates_a_cart_and_stock_and_prints_commands_that_pay_exactly_its_total(
    db: asyncpg.Connection, database_url: str
) -> None:
    status, out, err = await run_seed_cart(
        database_url, "--sku", "mug-blue", "--quantity", "3", "--price", "1250", "--stock", "7"
    )

    assert status == 0, err
    create = payment_of_create(printed_command(out, "stripe payment_intents create"))
    cart_id = create["metadata[cart_id]"]
    assert (create["amount"], create["currency"], create["capture_method"]) == (
        "3750",
        "usd",
        "manual",
    )
    trigger_argv = printed_command(out, "stripe trigger")
    assert trigger_argv[2] == "payment_intent.amount_capturable_updated"
    assert overrides_of_trigger(trigger_argv) == {
        "amount": "3750",
        "currency": "usd",
        "metadata.cart_id": cart_id,
    }
    cart = await db.fetchrow("SELECT currency FROM carts WHERE id = $1", cart_id)
    assert cart is not None and cart["currency"] == "usd"
    lines = await db.fetch(
        "SELECT sku, quantity, unit_amount FROM cart_items WHERE cart_id = $1", cart_id
    )
    assert [tuple(line) for line in lines] == [("mug-blue", 3, 1250)]
    assert (
        await db.fetchval("SELECT stocked_quantity FROM inventory_levels WHERE sku = 'mug-blue'")
        == 7
    )
    # Invariant 4 still holds: the stock came with its movement.
    assert await db.fetchval(
        "SELECT sum(quantity_delta) FROM inventory_movements WHERE sku = 'mug-blue'"
    ) == 7  # fmt: skip


async def test_an_existing_skus_level_is_kept_unless_stock_sets_it(
    db: asyncpg.Connection, database_url: str
) -> None:
    await run_seed_cart(database_url, "--sku", "mug-red", "--stock", "4")

    status, out, _ = await run_seed_cart(database_url, "--sku", "mug-red", "--cart-id", "cart-kept")
    assert status == 0 and "stock of mug-red: 4 (kept)" in out
    status, out, _ = await run_seed_cart(database_url, "--sku", "mug-red", "--stock", "9")
    assert status == 0 and "stock of mug-red: 9 (was 4)" in out

    levels = await db.fetchval(
        "SELECT stocked_quantity FROM inventory_levels WHERE sku = 'mug-red'"
    )
    moved = await db.fetchval(
        "SELECT sum(quantity_delta) FROM inventory_movements WHERE sku = 'mug-red'"
    )
    assert (levels, moved) == (9, 9)
    assert await db.fetchval("SELECT count(*) FROM carts") == 3


async def test_what_a_developer_must_fix_is_one_line_and_status_2(
    infra: Services, database_url: str
) -> None:
    assert (await run_seed_cart(database_url, "--cart-id", "cart-twice"))[0] == 0
    empty = f"intentflow_empty_{secrets.token_hex(4)}"
    admin = await asyncpg.connect(infra.database_url)
    await admin.execute(f'CREATE DATABASE "{empty}"')
    try:
        cases = {
            "exists already: choose another --cart-id": await run_seed_cart(
                database_url, "--cart-id", "cart-twice"
            ),
            "run `order-consumer migrate`": await run_seed_cart(
                f"{infra.database_url.rpartition('/')[0]}/{empty}"
            ),
            "set DATABASE_URL": await run_seed_cart(None),
        }
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{empty}" WITH (FORCE)')
        await admin.close()
    for advice, (status, out, err) in cases.items():
        assert (status, out) == (2, ""), advice
        assert err.startswith("seed-cart: ") and err.count("\n") == 1 and advice in err, err

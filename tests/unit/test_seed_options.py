"""`seed-cart`'s options and DATABASE_URL, refused in one line before anything is written.

A cart whose total Stripe refuses (below its minimum charge, above its largest
amount) makes `seed-cart` print a `stripe payment_intents create` command that
cannot pay for it; a number beyond the schema's columns used to end in a
traceback from the driver after the connection was made.
"""

from __future__ import annotations

import pytest

from intentflow.devservices import seed


@pytest.mark.parametrize(
    ("args", "advice"),
    [
        (["--quantity", "3000000000"], "--quantity"),
        (["--stock", "3000000000"], "--stock"),
        (["--price", "99999999999999999999"], "--price"),
        (["--quantity", "2", "--price", "9223372036854775807"], "--price"),
        (["--price", "100000000"], "--price"),  # $1,000,000.00: above Stripe's largest amount
        (["--quantity", "2", "--price", "60000000"], "total"),
        (["--price", "0"], "total"),  # Stripe charges at least its minimum (50 cents in usd)
    ],
)
def test_a_cart_stripe_or_the_schema_would_refuse_is_refused_before_the_database(
    args: list[str],
    advice: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # Nothing answers here: an option that passed its check would fail on the connection.
    monkeypatch.setenv("DATABASE_URL", "postgresql://postgres@127.0.0.1:1/postgres")
    with pytest.raises(SystemExit) as exited:
        seed.main(args)
    err = capsys.readouterr().err
    assert exited.value.code == 2
    assert err.splitlines()[-1].startswith("seed-cart: error:") and advice in err.splitlines()[-1]


def test_a_database_url_with_an_impossible_port_is_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("DATABASE_URL", "postgresql://postgres@127.0.0.1:99999/postgres")
    assert seed.main([]) == 2
    err = capsys.readouterr().err
    assert err.startswith("seed-cart: ") and err.count("\n") == 1, err

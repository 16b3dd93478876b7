"""The bridge's settings: what is refused, what is normalised, and the shutdown budget."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from intentflow.producer.settings import BridgeSettings
from intentflow.schemas.config import describe

SECRET = "whsec_unit"


@pytest.mark.parametrize("given", ["debug", "Warning", " ERROR "])
def test_log_level_is_accepted_in_any_case(given: str) -> None:
    settings = BridgeSettings(stripe_webhook_secret=SECRET, stripe_livemode=False, log_level=given)
    assert settings.log_level == given.strip().upper()


@pytest.mark.parametrize(
    ("given", "livemode"), [("true", True), ("TRUE", True), (" false ", False), ("False", False)]
)
def test_the_mode_is_read_from_the_environment_as_true_or_false(
    monkeypatch: pytest.MonkeyPatch, given: str, livemode: bool
) -> None:
    monkeypatch.setenv("STRIPE_WEBHOOK_SECRET", SECRET)
    monkeypatch.setenv("STRIPE_LIVEMODE", given)
    assert BridgeSettings().stripe_livemode is livemode


@pytest.mark.parametrize("given", [None, "", "yes", "1", "on", "live"])
def test_a_bridge_without_a_mode_is_refused_saying_which_to_choose(
    monkeypatch: pytest.MonkeyPatch, given: str | None
) -> None:
    """No default: one would either take test events into live stock or ignore every
    event of a staging shop. Anything but the two words is refused too."""
    monkeypatch.setenv("STRIPE_WEBHOOK_SECRET", SECRET)
    monkeypatch.delenv("STRIPE_LIVEMODE", raising=False)
    if given is not None:
        monkeypatch.setenv("STRIPE_LIVEMODE", given)
    with pytest.raises(ValidationError) as refused:
        BridgeSettings()
    said = describe(refused.value)
    first = "required" if given is None else "must be true or false"
    assert said.startswith(f"STRIPE_LIVEMODE: {first}: set true for a live-mode endpoint"), said
    assert "or false for a test-mode one" in said and "; " not in said  # one problem


@pytest.mark.parametrize(
    ("field", "value", "named"),
    [
        ("log_format", "text", "LOG_FORMAT"),
        ("log_level", "NOTSET", "LOG_LEVEL"),
        ("stripe_webhook_secret", "", "STRIPE_WEBHOOK_SECRET: is empty"),
        ("max_header_bytes", 10, "MAX_HEADER_BYTES"),
        ("header_timeout_s", 0, "HEADER_TIMEOUT_S"),
        # aiokafka would fail on it in the background, leaving a bridge that answers 503.
        ("kafka_bootstrap_servers", "127.0.0.1:notaport", "KAFKA_BOOTSTRAP_SERVERS"),
    ],
)
def test_a_value_that_cannot_work_is_refused_naming_the_variable(
    field: str, value: object, named: str
) -> None:
    values: dict[str, object] = {"stripe_webhook_secret": SECRET, "stripe_livemode": False}
    values[field] = value
    with pytest.raises(ValidationError) as refused:
        BridgeSettings(**values)  # type: ignore[arg-type]
    assert named in describe(refused.value)


@pytest.mark.parametrize("shutdown_timeout_s", [1.0, 6.0, 25.0, 120.0])
def test_draining_and_stopping_the_producer_fit_in_the_shutdown_deadline(
    shutdown_timeout_s: float,
) -> None:
    settings = BridgeSettings(
        stripe_webhook_secret=SECRET, stripe_livemode=False, shutdown_timeout_s=shutdown_timeout_s
    )
    budget = settings.drain_timeout_s + settings.producer_stop_timeout_s
    assert budget < shutdown_timeout_s or settings.producer_stop_timeout_s == 0.5
    assert settings.drain_timeout_s >= min(settings.kafka_publish_timeout_s, shutdown_timeout_s / 2)

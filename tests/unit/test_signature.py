"""Stripe-Signature verification: every secret is tried, and failures say why."""

from __future__ import annotations

import time

import pytest

from intentflow.producer.signature import SignatureError, SignatureVerifier
from intentflow.stripekit.signing import stripe_signature

BODY = b'{"id":"evt_1","type":"payment_intent.succeeded","data":{"object":{}}}'
OLD, NEW = "whsec_old", "whsec_new"


def reason_of(verifier: SignatureVerifier, body: bytes, header: str | None) -> str:
    with pytest.raises(SignatureError) as caught:
        verifier.verify(body, header)
    return caught.value.reason


def test_a_fresh_signature_with_the_secret_verifies() -> None:
    SignatureVerifier([NEW], 300).verify(BODY, stripe_signature(BODY, NEW))


def test_either_secret_verifies_during_rotation() -> None:
    verifier = SignatureVerifier([OLD, NEW], 300)
    verifier.verify(BODY, stripe_signature(BODY, OLD))
    verifier.verify(BODY, stripe_signature(BODY, NEW))


def test_a_header_with_several_v1_signatures_verifies_if_one_matches() -> None:
    header = stripe_signature(BODY, NEW) + ",v1=" + "0" * 64
    SignatureVerifier([NEW], 300).verify(BODY, header)


def test_an_unknown_secret_is_forged() -> None:
    verifier = SignatureVerifier([OLD, NEW], 300)
    assert reason_of(verifier, BODY, stripe_signature(BODY, "whsec_attacker")) == "forged"


def test_a_changed_body_is_forged() -> None:
    header = stripe_signature(BODY, NEW)
    assert reason_of(SignatureVerifier([NEW], 300), BODY + b" ", header) == "forged"


def test_an_old_timestamp_is_stale() -> None:
    header = stripe_signature(BODY, NEW, int(time.time()) - 301)
    assert reason_of(SignatureVerifier([NEW], 300), BODY, header) == "stale"


def test_an_old_timestamp_with_a_wrong_secret_is_forged_not_stale() -> None:
    header = stripe_signature(BODY, "whsec_attacker", int(time.time()) - 3600)
    assert reason_of(SignatureVerifier([NEW], 300), BODY, header) == "forged"


@pytest.mark.parametrize("header", [None, ""])
def test_no_header_is_missing(header: str | None) -> None:
    assert reason_of(SignatureVerifier([NEW], 300), BODY, header) == "missing"


@pytest.mark.parametrize(
    "header",
    ["garbage", "t=abc,v1=00", "t=123", "v1=00", "t=123,v0=00", "t=,v1=00", "t=123,v1="],
)
def test_a_header_not_shaped_like_stripes_is_malformed(header: str) -> None:
    assert reason_of(SignatureVerifier([NEW], 300), BODY, header) == "malformed"


def test_a_non_ascii_header_is_malformed_not_an_error() -> None:
    header = f"t={int(time.time())},v1=\u00e9{'0' * 63}"
    assert reason_of(SignatureVerifier([NEW], 300), BODY, header) == "malformed"


def test_a_body_that_is_not_utf8_is_refused() -> None:
    body = b"\xff\xfe"
    assert reason_of(SignatureVerifier([NEW], 300), body, stripe_signature(body, NEW)) == (
        "not-utf8"
    )


def test_no_secrets_is_a_configuration_error() -> None:
    with pytest.raises(ValueError):
        SignatureVerifier([], 300)

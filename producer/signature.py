"""Verification of the `Stripe-Signature` header over the raw request body.

The HMAC check itself is the `stripe` library's; this module adds what the
bridge needs around it: every configured secret is tried (secret rotation), and
a failure carries one short reason (`missing`, `malformed`, `forged`, `stale`)
that is safe to return to the caller and to count.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from stripe import SignatureVerificationError, WebhookSignature

Reason = Literal["missing", "malformed", "forged", "stale", "not-utf8"]


class SignatureError(Exception):
    """The request is not a webhook Stripe signed with one of our secrets, recently."""

    retriable = False

    def __init__(self, reason: Reason) -> None:
        super().__init__(reason)
        self.reason: Reason = reason


def _well_formed(header: str) -> bool:
    """`t=<int>` and at least one `v1=<hex>`, the shape Stripe sends."""
    timestamp_ok = False
    has_v1 = False
    for item in header.split(","):
        name, sep, value = item.strip().partition("=")
        if not sep:
            continue
        if name == "t":
            timestamp_ok = value.isascii() and value.isdigit()
        elif name == "v1" and value:
            has_v1 = True
    return timestamp_ok and has_v1


class SignatureVerifier:
    """Verifies webhooks against one or more endpoint secrets."""

    def __init__(self, secrets: Sequence[str], tolerance_s: int) -> None:
        if not secrets:
            raise ValueError("at least one webhook secret is required")
        self._secrets = tuple(secrets)
        self._tolerance_s = tolerance_s

    def verify(self, payload: bytes, header: str | None) -> None:
        """Return if `header` signs `payload` with any secret; raise SignatureError otherwise."""
        self.verify_signed(payload, self.check_shape(header))

    def check_shape(self, header: str | None) -> str:
        """The header, if it has Stripe's shape; SignatureError (missing, malformed) if not.

        Needs no body: the endpoint calls it before reading one.
        """
        if not header:
            raise SignatureError("missing")
        # Stripe's header is ASCII; the library would raise TypeError (not its own
        # error) comparing a non-ASCII signature, which would answer 500.
        if not header.isascii() or not _well_formed(header):
            raise SignatureError("malformed")
        return header

    def verify_signed(self, payload: bytes, header: str) -> None:
        """`verify` for a header `check_shape` accepted."""
        try:
            text = payload.decode("utf-8")
        except UnicodeDecodeError:
            raise SignatureError("not-utf8") from None
        for secret in self._secrets:
            try:
                WebhookSignature.verify_header(text, header, secret, self._tolerance_s)
            except SignatureVerificationError:
                continue
            return
        raise SignatureError("stale" if self._signed_long_ago(text, header) else "forged")

    def _signed_long_ago(self, text: str, header: str) -> bool:
        """Whether a secret signed it after all, with no limit on the timestamp's age.

        Asked of the library again rather than read from its error's wording;
        this costs a second HMAC per secret, on refused requests only.
        """
        for secret in self._secrets:
            try:
                WebhookSignature.verify_header(text, header, secret, tolerance=None)
            except SignatureVerificationError:
                continue
            return True
        return False

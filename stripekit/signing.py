"""Sign webhook bodies the way Stripe does, for tests and load generation."""

from __future__ import annotations

import hashlib
import hmac
import time


def stripe_signature(body: bytes, secret: str, timestamp: int | None = None) -> str:
    """The `Stripe-Signature` header value for `body`: `t=<unix>,v1=<hex hmac-sha256>`."""
    ts = int(time.time()) if timestamp is None else timestamp
    mac = hmac.new(secret.encode("utf-8"), b"%d." % ts + body, hashlib.sha256)
    return f"t={ts},v1={mac.hexdigest()}"

"""Stripe, as the rest of the repository meets it in tests, the demo and benchmarks.

`events`: Stripe event payloads shaped like the real ones (whole objects, real
sizes); `signing`: the `Stripe-Signature` header Stripe computes; `publish`:
events sent straight to Kafka as the webhook bridge would. Tests import these,
not the load-test harness (`loadtest/`), which builds on them.
"""

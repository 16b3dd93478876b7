"""What intentflow is measured against, kept out of the product packages.

- `per_event`: intentflow's own store applied one event per transaction (the
  consumer benchmark's baseline: what batching buys).
- `naive`: the webhook handler most shops write (look the order up, create it if
  none, check stock then decrement), in a schema of its own.
- `lease`: the same handler inside a lease lock per payment intent with a TTL.
- `delivery`: concurrent senders that hand every copy of an event to a handler
  at the same moment.
- `measure`: duplicate orders, oversold units and stock left, read back from
  either a shop's schema or intentflow's.
"""

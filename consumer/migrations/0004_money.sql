-- intentflow schema, version 4: no customer's money goes silent (issue 17).
-- One live order per cart (`duplicate`), refunds of what cannot be filled,
-- Connect accounts, capture deadlines, and Stripe's saved answers (key generations).

-- `duplicate`: the cart already had a live order of another intent; no stock,
-- its money released (consumer/allocation.py).
ALTER TABLE orders DROP CONSTRAINT orders_status_check;
ALTER TABLE orders ADD CONSTRAINT orders_status_check
    CHECK (status IN ('placed', 'out_of_stock', 'needs_review', 'canceled', 'refunded',
                      'disputed', 'duplicate'));
ALTER TABLE orders DROP CONSTRAINT orders_allocation_check;
ALTER TABLE orders ADD CONSTRAINT orders_allocation_check
    CHECK (allocation IN ('placed', 'out_of_stock', 'needs_review', 'skipped', 'duplicate'));

ALTER TABLE orders
    -- The Connect account the intent lives on (the event's `account`); NULL: the platform's own.
    ADD COLUMN account text,
    -- What Stripe captured of the intent (`amount_received`): what a refund can return.
    ADD COLUMN amount_captured bigint NOT NULL DEFAULT 0 CHECK (amount_captured >= 0),
    -- When Stripe lets the authorization lapse (the charge's
    -- payment_method_details.card.capture_before); NULL: not known.
    ADD COLUMN capture_before timestamptz,
    -- The order is its cart's one live order: allocated placed or needs_review, when
    -- created. With the status not canceled (canceled is final), the index below
    -- keeps one per cart whatever the code does.
    ADD COLUMN holds_cart boolean NOT NULL DEFAULT false;

ALTER TABLE payment_intents
    ADD COLUMN account text,
    ADD COLUMN amount_received bigint NOT NULL DEFAULT 0,
    ADD COLUMN capture_before bigint;

-- Before version 4 a cart could be paid twice and get two live orders: the
-- earliest of each cart's live orders holds it. Later ones stay as they are (they
-- took stock, and may have shipped); `reconcile` lists them (one_live_order_per_cart).
UPDATE orders o SET holds_cart = true
FROM (
    SELECT DISTINCT ON (cart_id) id FROM orders
    WHERE cart_id IS NOT NULL AND allocation IN ('placed', 'needs_review') AND status <> 'canceled'
    ORDER BY cart_id, id
) first WHERE o.id = first.id;

CREATE UNIQUE INDEX orders_one_live_order_per_cart_idx
    ON orders (cart_id) WHERE holds_cart AND status <> 'canceled';

-- What intentflow_consumer_refunds_owed and reconcile read: the orders that cannot be filled.
CREATE INDEX orders_unfillable_idx
    ON orders (payment_intent_id) WHERE allocation IN ('out_of_stock', 'duplicate');

-- What intentflow_consumer_captures_due_soon counts: placed orders by deadline.
CREATE INDEX orders_capture_before_idx
    ON orders (capture_before) WHERE status = 'placed' AND capture_before IS NOT NULL;

-- A Stripe action's key is `idempotency_key` at generation 0 and
-- `idempotency_key:<generation>` after: Stripe keeps the first answer to a key,
-- a 500 included, for at least 24 h, so an attempt whose outcome it may have
-- saved (a 5xx, a timeout) is followed by a read of the intent and, only if the
-- action is still needed, a call under the next generation. `verify_first`:
-- the last answer left the outcome unknown; read before acting again.
ALTER TABLE outbox
    ADD COLUMN key_generation integer NOT NULL DEFAULT 0 CHECK (key_generation >= 0),
    ADD COLUMN verify_first boolean NOT NULL DEFAULT false;
-- `outbox --failed`, the owed-refund gauge and `reconcile` read the failed rows.
CREATE INDEX outbox_failed_idx ON outbox (id) WHERE state = 'failed';

-- Upgrading: what was captured is known from now on; for the intents already
-- captured, the authorization is the best estimate (the relay reads Stripe's
-- own figure before it refunds anything).
UPDATE payment_intents p SET amount_received = coalesce(o.amount_authorized, o.amount)
FROM orders o WHERE o.payment_intent_id = p.id AND p.status = 'succeeded';
UPDATE orders o SET amount_captured = p.amount_received
FROM payment_intents p WHERE p.id = o.payment_intent_id AND p.status = 'succeeded';

-- Upgrading: an out_of_stock order whose money was captured gets its refund
-- asked for now, as it would have been under version 4 (the relay refunds only
-- under REFUND_UNFILLABLE=true; otherwise it lists the order as owed).
INSERT INTO outbox (kind, name, payment_intent_id, order_id, payload, idempotency_key)
SELECT 'stripe_action', 'refund_payment_intent', o.payment_intent_id, o.id,
       json_build_object('metadata', json_build_object(
           'intentflow_order_id', o.id::text, 'intentflow_reason', 'out_of_stock')),
       'intentflow:refund_payment_intent:' || o.payment_intent_id
FROM orders o JOIN payment_intents p ON p.id = o.payment_intent_id
WHERE o.allocation = 'out_of_stock' AND p.status = 'succeeded'
  AND o.amount_refunded < o.amount_captured
ORDER BY o.payment_intent_id
ON CONFLICT DO NOTHING;

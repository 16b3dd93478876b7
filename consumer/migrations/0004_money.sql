-- intentflow schema, version 4: no customer's money goes silent (issue 17).
-- One live order per cart (`duplicate`), refunds of what cannot be filled,
-- Connect accounts, capture deadlines, and Stripe's saved answers (key generations).
--
-- Written for a live database (consumer/migrate.py): each step takes one table's
-- lock for milliseconds (new columns with constant defaults and NOT VALID
-- constraints change only the catalog), and the long work runs where no writer
-- waits for it: constraints are validated in steps of their own (VALIDATE blocks
-- no writer), indexes are built CONCURRENTLY, rows are updated in batches. Every
-- step can run again after a crash. The old consumer (version 3) writes on
-- meanwhile: nothing here is a state it cannot work in.

-- `duplicate`: the cart already had a live order of another intent; no stock,
-- its money released (consumer/allocation.py). New rows are checked at once;
-- the old ones by the steps below.
ALTER TABLE orders DROP CONSTRAINT IF EXISTS orders_status_check;
ALTER TABLE orders ADD CONSTRAINT orders_status_check
    CHECK (status IN ('placed', 'out_of_stock', 'needs_review', 'canceled', 'refunded',
                      'disputed', 'duplicate')) NOT VALID;
ALTER TABLE orders DROP CONSTRAINT IF EXISTS orders_allocation_check;
ALTER TABLE orders ADD CONSTRAINT orders_allocation_check
    CHECK (allocation IN ('placed', 'out_of_stock', 'needs_review', 'skipped', 'duplicate'))
    NOT VALID;

ALTER TABLE orders
    -- The Connect account the intent lives on (the event's `account`); NULL: the platform's own.
    ADD COLUMN IF NOT EXISTS account text,
    -- What Stripe captured of the intent (`amount_received`): what a refund can return.
    ADD COLUMN IF NOT EXISTS amount_captured bigint NOT NULL DEFAULT 0,
    -- When Stripe lets the authorization lapse (the charge's
    -- payment_method_details.card.capture_before); NULL: not known.
    ADD COLUMN IF NOT EXISTS capture_before timestamptz,
    -- The order is its cart's one live order: allocated placed or needs_review, when
    -- created. With the status not canceled (canceled is final), the index below
    -- keeps one per cart whatever the code does.
    ADD COLUMN IF NOT EXISTS holds_cart boolean NOT NULL DEFAULT false;
ALTER TABLE orders DROP CONSTRAINT IF EXISTS orders_amount_captured_check;
ALTER TABLE orders ADD CONSTRAINT orders_amount_captured_check
    CHECK (amount_captured >= 0) NOT VALID;

-- step: transaction
ALTER TABLE payment_intents
    ADD COLUMN IF NOT EXISTS account text,
    ADD COLUMN IF NOT EXISTS amount_received bigint NOT NULL DEFAULT 0,
    ADD COLUMN IF NOT EXISTS capture_before bigint;

-- step: transaction
-- A Stripe action's key is `idempotency_key` at generation 0 and
-- `idempotency_key:<generation>` after: Stripe keeps the first answer to a key,
-- a 500 included, for at least 24 h, so an attempt whose outcome it may have
-- saved (a 5xx, a timeout) is followed by a read of the intent and, only if the
-- action is still needed, a call under the next generation. `verify_first`:
-- the last answer left the outcome unknown; read before acting again.
ALTER TABLE outbox
    ADD COLUMN IF NOT EXISTS key_generation integer NOT NULL DEFAULT 0,
    ADD COLUMN IF NOT EXISTS verify_first boolean NOT NULL DEFAULT false;
ALTER TABLE outbox DROP CONSTRAINT IF EXISTS outbox_key_generation_check;
ALTER TABLE outbox ADD CONSTRAINT outbox_key_generation_check
    CHECK (key_generation >= 0) NOT VALID;

-- step: transaction
ALTER TABLE orders VALIDATE CONSTRAINT orders_status_check;
-- step: transaction
ALTER TABLE orders VALIDATE CONSTRAINT orders_allocation_check;
-- step: transaction
ALTER TABLE orders VALIDATE CONSTRAINT orders_amount_captured_check;
-- step: transaction
ALTER TABLE outbox VALIDATE CONSTRAINT outbox_key_generation_check;

-- step: transaction
-- Before version 4 a cart could be paid twice and get two live orders: the
-- earliest of each cart's live orders holds it. Later ones stay as they are (they
-- took stock, and may have shipped); `reconcile` lists them (one_live_order_per_cart).
-- Which order is each cart's earliest is read once (no index on cart_id: a scan, which
-- blocks no writer) into a work table, then set in batches.
DROP TABLE IF EXISTS intentflow_0004_cart_holders;
CREATE UNLOGGED TABLE intentflow_0004_cart_holders AS
SELECT DISTINCT ON (cart_id) id FROM orders
WHERE cart_id IS NOT NULL AND allocation IN ('placed', 'needs_review') AND status <> 'canceled'
ORDER BY cart_id, id;
ALTER TABLE intentflow_0004_cart_holders ADD PRIMARY KEY (id);

-- step: in batches
-- A window of 10,000 order ids a transaction, each holding its rows' locks for a
-- few tens of milliseconds; $1 is where the last window ended, and the statement
-- returns where this one did, or nothing once no holder is left beyond it.
WITH held AS (
    UPDATE orders o SET holds_cart = true
    FROM intentflow_0004_cart_holders h
    WHERE h.id > coalesce($1::bigint, 0) AND h.id <= coalesce($1::bigint, 0) + 10000
      AND o.id = h.id AND NOT o.holds_cart
)
SELECT coalesce($1::bigint, 0) + 10000
WHERE coalesce($1::bigint, 0) + 10000 < (SELECT max(id) FROM intentflow_0004_cart_holders);

-- step: transaction
DROP TABLE IF EXISTS intentflow_0004_cart_holders;

-- step: outside a transaction
CREATE UNIQUE INDEX CONCURRENTLY IF NOT EXISTS orders_one_live_order_per_cart_idx
    ON orders (cart_id) WHERE holds_cart AND status <> 'canceled';

-- step: outside a transaction
-- What intentflow_consumer_refunds_owed and reconcile read: the orders that cannot be filled.
CREATE INDEX CONCURRENTLY IF NOT EXISTS orders_unfillable_idx
    ON orders (payment_intent_id) WHERE allocation IN ('out_of_stock', 'duplicate');

-- step: outside a transaction
-- What intentflow_consumer_captures_due_soon counts: placed orders by deadline.
CREATE INDEX CONCURRENTLY IF NOT EXISTS orders_capture_before_idx
    ON orders (capture_before) WHERE status = 'placed' AND capture_before IS NOT NULL;

-- step: outside a transaction
-- `outbox --failed`, the owed-refund gauge and `reconcile` read the failed rows.
CREATE INDEX CONCURRENTLY IF NOT EXISTS outbox_failed_idx ON outbox (id) WHERE state = 'failed';

-- step: in batches
-- Upgrading: what was captured is known from now on; for the intents already
-- captured, the authorization is the best estimate (the relay reads Stripe's
-- own figure before it refunds anything), on the intent and on its order. A window
-- of 2,000 order ids a transaction: small enough that the planner looks each intent
-- up by its key (with 5,000 it scanned every intent instead: 150 ms a window against
-- 10 to 20 ms, 1 M orders on PostgreSQL 15).
WITH succeeded AS MATERIALIZED (
    SELECT o.id, o.payment_intent_id, coalesce(o.amount_authorized, o.amount) AS received
    FROM orders o JOIN payment_intents p ON p.id = o.payment_intent_id
    WHERE o.id > coalesce($1::bigint, 0) AND o.id <= coalesce($1::bigint, 0) + 2000
      AND p.status = 'succeeded'
), intents AS (
    UPDATE payment_intents p SET amount_received = s.received
    FROM succeeded s WHERE p.id = s.payment_intent_id
), captured AS (
    UPDATE orders o SET amount_captured = s.received FROM succeeded s WHERE o.id = s.id
)
SELECT coalesce($1::bigint, 0) + 2000
WHERE coalesce($1::bigint, 0) + 2000 < (SELECT max(id) FROM orders);

-- step: transaction
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

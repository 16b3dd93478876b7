-- intentflow schema, version 2: the whole life of a payment (issue 7).
-- Facts about an intent may arrive before its authorization, so they live on
-- payment_intents; an order copies them and derives its status from them and
-- from its allocation (consumer/decisions.py, `order_status`).

-- The order statuses of docs/design.md ("Order statuses").
ALTER TABLE orders DROP CONSTRAINT orders_status_check;
ALTER TABLE orders ADD CONSTRAINT orders_status_check
    CHECK (status IN ('placed', 'out_of_stock', 'needs_review', 'canceled', 'refunded', 'disputed'));

-- What allocation decided when the order was created; `status` is derived from
-- it and the intent's facts. `skipped`: the intent was already canceled, so no
-- stock was asked for.
ALTER TABLE orders
    ADD COLUMN allocation text,
    ADD COLUMN amount_authorized bigint,
    ADD COLUMN amount_refunded bigint NOT NULL DEFAULT 0 CHECK (amount_refunded >= 0),
    ADD COLUMN cancellation_reason text,
    ADD COLUMN dispute_status text,
    ADD COLUMN dispute_amount bigint,
    ADD COLUMN dispute_reason text;
UPDATE orders SET allocation = CASE
    WHEN status IN ('placed', 'out_of_stock', 'needs_review') THEN status ELSE 'needs_review' END;
ALTER TABLE orders ALTER COLUMN allocation SET NOT NULL;
ALTER TABLE orders ADD CONSTRAINT orders_allocation_check
    CHECK (allocation IN ('placed', 'out_of_stock', 'needs_review', 'skipped'));

-- Stock is taken once and restored once per order and SKU: a second movement
-- for the same (order, SKU, reason) is refused whatever the code above does.
CREATE UNIQUE INDEX inventory_movements_once_per_order_idx
    ON inventory_movements (order_id, sku, reason) WHERE order_id IS NOT NULL;

-- The intent's status is the one of the greatest event seen, by
-- (tier of the status, event `created`, step of the event type, event id):
-- see consumer/lifecycle.py. NULL until a payment_intent event is seen (a
-- charge or dispute event may come first).
ALTER TABLE payment_intents
    ALTER COLUMN status DROP NOT NULL,
    ALTER COLUMN last_event_id DROP NOT NULL,
    ADD COLUMN status_created bigint,
    ADD COLUMN status_step smallint,
    ADD COLUMN cancellation_reason text,
    -- The largest `amount_refunded` seen on the intent's charges, and whether a
    -- charge said it was refunded in full.
    ADD COLUMN charge_amount_refunded bigint NOT NULL DEFAULT 0,
    ADD COLUMN charge_refunded boolean NOT NULL DEFAULT false,
    -- The dispute with the greatest (event created, status rank, dispute id).
    ADD COLUMN dispute_id text,
    ADD COLUMN dispute_status text,
    ADD COLUMN dispute_amount bigint,
    ADD COLUMN dispute_reason text,
    ADD COLUMN dispute_created bigint;

-- Refund objects (charge.refund.updated), each at its latest known status.
CREATE TABLE refunds (
    id                text PRIMARY KEY,
    payment_intent_id text NOT NULL,
    amount            bigint NOT NULL CHECK (amount >= 0),
    status            text NOT NULL,
    status_created    bigint NOT NULL,
    updated_at        timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX refunds_payment_intent_id_idx ON refunds (payment_intent_id);

-- Inbox retention (`order-consumer prune`) deletes by age.
CREATE INDEX processed_events_processed_at_idx ON processed_events (processed_at);

-- Version 1 recorded a cancellation on the intent but left its order as it was,
-- a placed one with its stock taken: give that stock back once, as the consumer
-- now does, and mark those orders canceled. The movements are this
-- migration's own, so the external-change trigger stays out of it.
SELECT set_config('intentflow.applying', 'on', true);
WITH given_back AS (
    INSERT INTO inventory_movements (sku, quantity_delta, reason, order_id, event_id)
    SELECT m.sku, -sum(m.quantity_delta)::int, 'cancellation', m.order_id, p.last_event_id
    FROM inventory_movements m
    JOIN orders o ON o.id = m.order_id
    JOIN payment_intents p ON p.id = o.payment_intent_id
    WHERE m.reason = 'order' AND o.status = 'placed' AND p.status = 'canceled'
    GROUP BY m.sku, m.order_id, p.last_event_id
    HAVING sum(m.quantity_delta) < 0
    RETURNING sku, quantity_delta
)
UPDATE inventory_levels l
SET stocked_quantity = l.stocked_quantity + g.quantity, updated_at = now()
FROM (SELECT sku, sum(quantity_delta) AS quantity FROM given_back GROUP BY sku) g
WHERE l.sku = g.sku;
UPDATE orders o SET status = 'canceled', updated_at = now()
FROM payment_intents p
WHERE p.id = o.payment_intent_id AND p.status = 'canceled' AND o.status <> 'canceled';
SELECT set_config('intentflow.applying', 'off', true);

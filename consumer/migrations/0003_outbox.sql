-- intentflow schema, version 3: act on Stripe and tell the business (issue 8).
-- The outbox holds what must happen outside PostgreSQL because of an order
-- change, written in the transaction that makes the change; the relay
-- (consumer/relay.py) performs each row and marks it done.

CREATE TABLE outbox (
    -- Ids increase per payment intent in commit order: the intent's row is
    -- locked by every transaction that writes one of its outbox rows.
    -- created_at is the transaction's now(): the time of the change.
    id                bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    kind              text NOT NULL CHECK (kind IN ('stripe_action', 'order_event')),
    -- `cancel_payment_intent` or `capture_payment_intent`; `order.<status>` or `order.updated`.
    name              text NOT NULL,
    payment_intent_id text NOT NULL,
    order_id          bigint NOT NULL,
    -- A Stripe action's parameters, or the order event as published, less its
    -- `outbox_id` and `occurred_at` (this row's id and created_at, added by the
    -- relay). json, not jsonb: stored as written, at half the cost per order.
    payload           json NOT NULL,
    -- Derived from the intent and the action: a retry after a crash never acts twice.
    idempotency_key   text,
    state             text NOT NULL DEFAULT 'pending' CHECK (state IN ('pending', 'done', 'failed')),
    -- done: succeeded, already_done or published; failed: rejected (Stripe said no for good).
    outcome           text,
    attempts          integer NOT NULL DEFAULT 0,
    due_at            timestamptz NOT NULL DEFAULT now(),
    error_code        text,
    last_error        text,
    created_at        timestamptz NOT NULL DEFAULT now(),
    done_at           timestamptz,
    CHECK ((kind = 'stripe_action') = (idempotency_key IS NOT NULL)),
    CHECK ((state = 'pending') = (done_at IS NULL))
);

-- One row per Stripe action and intent, whoever asks for it and however often.
CREATE UNIQUE INDEX outbox_one_action_per_intent_idx
    ON outbox (payment_intent_id, name) WHERE kind = 'stripe_action';
-- What the relay claims, oldest first.
CREATE INDEX outbox_due_idx ON outbox (kind, id) WHERE state = 'pending';
-- An order event waits for the intent's earlier ones (order per intent).
CREATE INDEX outbox_pending_events_idx
    ON outbox (payment_intent_id, id) WHERE state = 'pending' AND kind = 'order_event';
-- Retention (`order-consumer prune`) deletes finished rows by age.
CREATE INDEX outbox_done_at_idx ON outbox (done_at) WHERE state <> 'pending';

-- The relay's sweep for needs_review orders older than NEEDS_REVIEW_CANCEL_AFTER_S.
CREATE INDEX orders_needs_review_idx ON orders (created_at) WHERE status = 'needs_review';

-- Upgrading: an out_of_stock order whose money is still held gets its cancel
-- now, as it would have had it been created under version 3. Performed only
-- once the relay has STRIPE_API_KEY. Earlier order changes get no order event.
INSERT INTO outbox (kind, name, payment_intent_id, order_id, payload, idempotency_key)
SELECT 'stripe_action', 'cancel_payment_intent', o.payment_intent_id, o.id,
       '{"cancellation_reason": "abandoned"}',
       'intentflow:cancel_payment_intent:' || o.payment_intent_id
FROM orders o JOIN payment_intents p ON p.id = o.payment_intent_id
WHERE o.status = 'out_of_stock' AND p.status = 'requires_capture'
ORDER BY o.payment_intent_id;

-- intentflow schema, version 6: Stripe as shops use it (issue 18).
-- An order's terms join the intent and its Checkout Session (consumer/facts.py),
-- refunds count from what Stripe says now, authorizations can be incremented,
-- and Radar's review and the issuer's early fraud warning ride on the order.

-- The intent's latest snapshot of each thing Stripe tells, with the key that orders
-- snapshots: (event created, step, event id). consumer/lifecycle.py merges them.
ALTER TABLE payment_intents
    -- The captured charge's latest snapshot (charge_amount_refunded and
    -- charge_refunded are its values now, no longer the largest ever seen).
    ADD COLUMN charge_created bigint,
    ADD COLUMN charge_step smallint,
    ADD COLUMN charge_event_id text,
    -- The rest of a partial capture Stripe released as a refund object (before API
    -- 2025-03-31.basil): among the refunds, and no money sent back.
    ADD COLUMN released bigint NOT NULL DEFAULT 0,
    -- The latest authorization (or capture): an increment moves it.
    ADD COLUMN auth_created bigint,
    ADD COLUMN auth_step smallint,
    ADD COLUMN auth_event_id text,
    ADD COLUMN auth_amount bigint,
    ADD COLUMN auth_currency text,
    ADD COLUMN auth_held bigint,
    -- From a capture (`succeeded`), not a hold: a hold outranks a capture.
    ADD COLUMN auth_captured boolean,
    -- When the money was first held or received: orders are served first paid first.
    ADD COLUMN paid_at bigint,
    -- The cart the intent's metadata names (CART_METADATA_KEY): from its earliest
    -- snapshot that holds the money (`named_held`), else its latest that names one.
    ADD COLUMN named_cart_id text,
    ADD COLUMN named_created bigint,
    ADD COLUMN named_step smallint,
    ADD COLUMN named_event_id text,
    ADD COLUMN named_held boolean,
    -- The Checkout Session, Radar's review and the early fraud warning, each at its
    -- latest snapshot: read whole by the consumer, as written (json, not jsonb).
    -- The dispute's `is_charge_refundable`: an open dispute that allows a refund.
    ADD COLUMN dispute_refundable boolean,
    ADD COLUMN checkout json,
    ADD COLUMN review json,
    ADD COLUMN fraud_warning json;

-- Upgrading: the refunds a charge reported are its latest word, at the lowest key.
UPDATE payment_intents SET charge_created = 0, charge_step = 0, charge_event_id = ''
WHERE charge_amount_refunded > 0 OR charge_refunded;

-- When a refund was made (its own `created`): a refund that fails after the charge
-- last spoke, and was made before, is still counted in what the charge says.
ALTER TABLE refunds ADD COLUMN opened bigint;
UPDATE refunds SET opened = status_created;
ALTER TABLE refunds ALTER COLUMN opened SET NOT NULL;

ALTER TABLE orders
    -- What the cart was checked against (a Checkout Session's subtotal, else the
    -- amount), and the rest of what the buyer was asked to pay (`amount`).
    ADD COLUMN amount_subtotal bigint,
    ADD COLUMN amount_shipping bigint NOT NULL DEFAULT 0,
    ADD COLUMN amount_discount bigint NOT NULL DEFAULT 0,
    ADD COLUMN amount_tax bigint NOT NULL DEFAULT 0,
    ADD COLUMN dispute_refundable boolean,
    ADD COLUMN checkout_session_id text,
    ADD COLUMN review_id text,
    ADD COLUMN review_open boolean,
    ADD COLUMN review_reason text,
    ADD COLUMN review_closed_reason text,
    ADD COLUMN fraud_warning_id text,
    ADD COLUMN fraud_warning_type text,
    ADD COLUMN fraud_warning_actionable boolean;

-- Upgrading: an order made before version 6 had its terms from its authorization;
-- they are the intent's now, at the lowest key, so that any later authorization
-- (an increment) replaces them. Its cart and when it was paid, likewise.
UPDATE payment_intents p
SET auth_created = 0, auth_step = 0, auth_event_id = '', auth_amount = o.amount,
    auth_currency = o.currency, auth_held = coalesce(o.amount_authorized, o.amount),
    auth_captured = false,
    named_cart_id = o.cart_id, named_created = 0, named_step = 0, named_event_id = '',
    named_held = true,
    paid_at = extract(epoch FROM o.created_at)::bigint
FROM orders o
WHERE o.payment_intent_id = p.id AND o.allocation <> 'skipped' AND o.cart_id IS NOT NULL;
UPDATE orders SET amount_subtotal = amount WHERE amount_subtotal IS NULL;

-- intentflow schema, version 6: Stripe as shops use it (issue 18).
-- An order's terms join the intent and its Checkout Session (consumer/facts.py),
-- refunds count from what Stripe says now, authorizations can be incremented,
-- and Radar's review and the issuer's early fraud warning ride on the order.
--
-- Written for a live database (consumer/migrate.py): the new columns are nullable or
-- have constant defaults (a change of the catalog only), and the backfills run in
-- batches, each a short transaction. A version-5 consumer writes on meanwhile: a row
-- it writes without the new values reads as an upgraded one (consumer/intents.py:
-- a refund's `opened` is its status time; consumer/outbox.py: an order's subtotal
-- is its amount). Every step can run again after a crash. An order made before
-- version 6 keeps amount_subtotal NULL: it was checked against its amount.

-- step: transaction
-- The intent's latest snapshot of each thing Stripe tells, with the key that orders
-- snapshots: (event created, step, event id). consumer/lifecycle.py merges them.
ALTER TABLE payment_intents
    -- The captured charge's latest snapshot (charge_amount_refunded and
    -- charge_refunded are its values now, no longer the largest ever seen).
    ADD COLUMN IF NOT EXISTS charge_created bigint,
    ADD COLUMN IF NOT EXISTS charge_step smallint,
    ADD COLUMN IF NOT EXISTS charge_event_id text,
    -- The rest of a partial capture Stripe released as a refund object (before API
    -- 2025-03-31.basil): among the refunds, and no money sent back.
    ADD COLUMN IF NOT EXISTS released bigint NOT NULL DEFAULT 0,
    -- The latest authorization (or capture): an increment moves it.
    ADD COLUMN IF NOT EXISTS auth_created bigint,
    ADD COLUMN IF NOT EXISTS auth_step smallint,
    ADD COLUMN IF NOT EXISTS auth_event_id text,
    ADD COLUMN IF NOT EXISTS auth_amount bigint,
    ADD COLUMN IF NOT EXISTS auth_currency text,
    ADD COLUMN IF NOT EXISTS auth_held bigint,
    -- From a capture (`succeeded`), not a hold: a hold outranks a capture.
    ADD COLUMN IF NOT EXISTS auth_captured boolean,
    -- When the money was first held or received: orders are served first paid first.
    ADD COLUMN IF NOT EXISTS paid_at bigint,
    -- The cart the intent's metadata names (CART_METADATA_KEY): from its earliest
    -- snapshot that holds the money (`named_held`), else its latest that names one.
    ADD COLUMN IF NOT EXISTS named_cart_id text,
    ADD COLUMN IF NOT EXISTS named_created bigint,
    ADD COLUMN IF NOT EXISTS named_step smallint,
    ADD COLUMN IF NOT EXISTS named_event_id text,
    ADD COLUMN IF NOT EXISTS named_held boolean,
    -- The Checkout Session, Radar's review and the early fraud warning, each at its
    -- latest snapshot: read whole by the consumer, as written (json, not jsonb).
    -- The dispute's `is_charge_refundable`: an open dispute that allows a refund.
    ADD COLUMN IF NOT EXISTS dispute_refundable boolean,
    ADD COLUMN IF NOT EXISTS checkout json,
    ADD COLUMN IF NOT EXISTS review json,
    ADD COLUMN IF NOT EXISTS fraud_warning json;

-- step: transaction
-- When a refund was made (its own `created`): a refund that fails after the charge
-- last spoke, and was made before, is still counted in what the charge says.
ALTER TABLE refunds ADD COLUMN IF NOT EXISTS opened bigint;

-- step: transaction
ALTER TABLE orders
    -- What the cart was checked against (a Checkout Session's subtotal, else the
    -- amount), and the rest of what the buyer was asked to pay (`amount`).
    ADD COLUMN IF NOT EXISTS amount_subtotal bigint,
    ADD COLUMN IF NOT EXISTS amount_shipping bigint NOT NULL DEFAULT 0,
    ADD COLUMN IF NOT EXISTS amount_discount bigint NOT NULL DEFAULT 0,
    ADD COLUMN IF NOT EXISTS amount_tax bigint NOT NULL DEFAULT 0,
    ADD COLUMN IF NOT EXISTS dispute_refundable boolean,
    ADD COLUMN IF NOT EXISTS checkout_session_id text,
    ADD COLUMN IF NOT EXISTS review_id text,
    ADD COLUMN IF NOT EXISTS review_open boolean,
    ADD COLUMN IF NOT EXISTS review_reason text,
    ADD COLUMN IF NOT EXISTS review_closed_reason text,
    ADD COLUMN IF NOT EXISTS fraud_warning_id text,
    ADD COLUMN IF NOT EXISTS fraud_warning_type text,
    ADD COLUMN IF NOT EXISTS fraud_warning_actionable boolean;

-- step: in batches
-- Upgrading: the refunds a charge reported are its latest word, at the lowest key.
-- 5,000 intents a transaction, by their key; $1 is the last id of the batch before.
WITH batch AS MATERIALIZED (
    SELECT id FROM payment_intents WHERE id > coalesce($1::text, '') ORDER BY id LIMIT 5000
), upgraded AS (
    UPDATE payment_intents p SET charge_created = 0, charge_step = 0, charge_event_id = ''
    FROM batch b
    WHERE p.id = b.id AND p.charge_created IS NULL
      AND (p.charge_amount_refunded > 0 OR p.charge_refunded)
)
SELECT max(id) FROM batch;

-- step: in batches
-- Upgrading: a refund recorded before version 6 was made when it was first seen.
WITH batch AS MATERIALIZED (
    SELECT id FROM refunds WHERE id > coalesce($1::text, '') ORDER BY id LIMIT 5000
), upgraded AS (
    UPDATE refunds r SET opened = r.status_created
    FROM batch b WHERE r.id = b.id AND r.opened IS NULL
)
SELECT max(id) FROM batch;

-- step: in batches
-- Upgrading: an order made before version 6 had its terms from its authorization;
-- they are the intent's now, at the lowest key, so that any later authorization
-- (an increment) replaces them. Its cart and when it was paid, likewise. A window
-- of 2,000 order ids a transaction (as 0004's backfill of what was captured).
WITH legacy AS MATERIALIZED (
    SELECT o.payment_intent_id, o.amount, o.currency,
           coalesce(o.amount_authorized, o.amount) AS held, o.cart_id,
           extract(epoch FROM o.created_at)::bigint AS paid_at
    FROM orders o
    WHERE o.id > coalesce($1::bigint, 0) AND o.id <= coalesce($1::bigint, 0) + 2000
      AND o.allocation <> 'skipped' AND o.cart_id IS NOT NULL
), upgraded AS (
    UPDATE payment_intents p
    SET auth_created = 0, auth_step = 0, auth_event_id = '', auth_amount = l.amount,
        auth_currency = l.currency, auth_held = l.held, auth_captured = false,
        named_cart_id = l.cart_id, named_created = 0, named_step = 0, named_event_id = '',
        named_held = true, paid_at = l.paid_at
    FROM legacy l
    WHERE p.id = l.payment_intent_id AND p.auth_created IS NULL
)
SELECT coalesce($1::bigint, 0) + 2000
WHERE coalesce($1::bigint, 0) + 2000 < (SELECT max(id) FROM orders);

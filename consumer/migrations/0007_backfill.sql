-- intentflow schema, version 7: what `order-consumer backfill` has read of Stripe's
-- Events API (issue 21), so that a run cut short goes on where it stopped.
--
-- New tables, nothing else touched: a version-6 consumer writes on unaware.

-- step: transaction
-- One backfill: the window of event creation times it reads, and whose events.
CREATE TABLE IF NOT EXISTS backfill_runs (
    id bigserial PRIMARY KEY,
    since timestamptz NOT NULL,
    until timestamptz NOT NULL,
    -- `platform`, one connected account's id, or `all` (every connected account).
    scope text NOT NULL,
    started_at timestamptz NOT NULL DEFAULT now(),
    finished_at timestamptz,
    CHECK (since < until)
);

-- Per account (`` for the platform's own events): every event created before
-- `done_until` has been read and published, or found already known.
CREATE TABLE IF NOT EXISTS backfill_progress (
    run_id bigint NOT NULL REFERENCES backfill_runs (id) ON DELETE CASCADE,
    account text NOT NULL,
    done_until timestamptz NOT NULL,
    read bigint NOT NULL DEFAULT 0,
    published bigint NOT NULL DEFAULT 0,
    known bigint NOT NULL DEFAULT 0,
    skipped bigint NOT NULL DEFAULT 0,
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (run_id, account)
);

-- The line `order-consumer prune` deleted inbox rows before (the latest of its runs):
-- an event applied before it may have lost its inbox row, and published again would
-- be applied again, so `backfill` reads nothing created before it.
CREATE TABLE IF NOT EXISTS inbox_pruned (
    only_row boolean PRIMARY KEY DEFAULT true CHECK (only_row),
    before timestamptz NOT NULL
);

-- A database pruned before this version has no line yet: its oldest inbox row stands
-- for it (no event processed before that row still has its own).
INSERT INTO inbox_pruned (before)
SELECT min(processed_at) FROM processed_events HAVING min(processed_at) IS NOT NULL
ON CONFLICT (only_row) DO NOTHING;

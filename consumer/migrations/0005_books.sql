-- intentflow schema, version 5: books that an ordinary action cannot break (issue 17).
-- Invariant 4 (the movements of a SKU sum to its level) needs the level row to
-- stay while movements name its SKU, and every level written outside the
-- consumer to get the movement that explains it, whatever came before.
--
-- Written for a live database (consumer/migrate.py): the triggers take
-- inventory_levels' lock for a moment, the scan of every movement that puts back
-- deleted rows runs in a step of its own, and every step can run again.

-- A level written outside the consumer (a storefront's INSERT, a manual UPDATE)
-- gets the movement that makes its SKU's movements sum to the new level. Version
-- 1 recorded the row's own change (NEW - OLD, or all of NEW on INSERT), which is
-- the same while the books hold, but re-inserting a row whose SKU already had
-- movements counted the old ones twice, and no UPDATE could mend a level changed
-- behind the trigger's back. The sum is stable here: the consumer writes a SKU's
-- movements only while it holds the level row's lock (`_lock_stock`), which this
-- statement holds too, and READ COMMITTED reads the movements committed before
-- it got it. The consumer's own writes set intentflow.applying and skip this;
-- an external write pays for the sum, about 15 ms for a SKU with 200,000
-- movements (PostgreSQL 15, measured), 1 ms for a few.
CREATE OR REPLACE FUNCTION record_external_stock_change() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    moved bigint := (SELECT coalesce(sum(quantity_delta), 0)
                     FROM inventory_movements WHERE sku = NEW.sku);
    delta bigint := NEW.stocked_quantity - moved;
BEGIN
    IF delta <> 0 THEN
        INSERT INTO inventory_movements (sku, quantity_delta, reason)
        VALUES (NEW.sku, delta, CASE WHEN delta > 0 THEN 'restock' ELSE 'adjustment' END);
    END IF;
    RETURN NULL;
END;
$$;

-- step: transaction
-- A stock row whose SKU has movements cannot go (deleted, or renamed away): the
-- consumer's later movements for it would have no level to change, and its books
-- would never balance again. To retire a SKU, set its stocked_quantity to 0.
-- Checked at commit, like a deferred foreign key, so that one transaction may
-- replace a row, or empty both tables. Not a foreign key from movements: its
-- violation (23503) on the consumer's INSERT would dead-letter the event, when a
-- missing row is the operator's to mend (orders.py, StockRowMissing), and its
-- check would cost every movement the consumer writes.
CREATE OR REPLACE FUNCTION refuse_stock_row_with_movements_gone() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    movements bigint;
BEGIN
    IF TG_OP = 'UPDATE' AND NEW.sku = OLD.sku THEN
        RETURN NULL;
    END IF;
    IF EXISTS (SELECT 1 FROM inventory_levels WHERE sku = OLD.sku) THEN
        RETURN NULL;  -- put back in the same transaction
    END IF;
    movements := (SELECT count(*) FROM inventory_movements WHERE sku = OLD.sku);
    IF movements > 0 THEN
        RAISE foreign_key_violation USING
            MESSAGE = format(
                'the inventory_levels row of SKU %L cannot be %s: %s inventory movements '
                'name it and would no longer sum to a level; to retire the SKU, set its '
                'stocked_quantity to 0 instead',
                OLD.sku, CASE WHEN TG_OP = 'DELETE' THEN 'deleted' ELSE 'renamed' END,
                movements),
            TABLE = 'inventory_levels';
    END IF;
    RETURN NULL;
END;
$$;

DROP TRIGGER IF EXISTS inventory_levels_keep_rows_with_movements ON inventory_levels;
CREATE CONSTRAINT TRIGGER inventory_levels_keep_rows_with_movements
AFTER DELETE OR UPDATE OF sku ON inventory_levels
DEFERRABLE INITIALLY DEFERRED
FOR EACH ROW EXECUTE FUNCTION refuse_stock_row_with_movements_gone();

-- TRUNCATE fires no row trigger. After the statement (which may truncate
-- inventory_movements with it) no level row is left, so any movement is one too many.
CREATE OR REPLACE FUNCTION refuse_truncating_stock_with_movements() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    named text := (SELECT sku FROM inventory_movements ORDER BY sku LIMIT 1);
BEGIN
    IF named IS NOT NULL THEN
        RAISE foreign_key_violation USING
            MESSAGE = format(
                'inventory_levels cannot be truncated: inventory movements name its SKUs '
                '(%L among them) and would no longer sum to a level; to retire a SKU, set '
                'its stocked_quantity to 0 instead', named),
            TABLE = 'inventory_levels';
    END IF;
    RETURN NULL;
END;
$$;

DROP TRIGGER IF EXISTS inventory_levels_truncate_keeps_rows_with_movements ON inventory_levels;
CREATE TRIGGER inventory_levels_truncate_keeps_rows_with_movements
AFTER TRUNCATE ON inventory_levels
FOR EACH STATEMENT EXECUTE FUNCTION refuse_truncating_stock_with_movements();

-- step: transaction
-- Upgrading: a SKU whose row was deleted under version 4 gets it back at 0, as
-- retired, with the movement that balances its books (the trigger above): until
-- then, the next cancellation of one of its orders would hold its partition
-- (stock_row_missing). Its new orders go out of stock, as they did without a row.
INSERT INTO inventory_levels (sku, stocked_quantity)
SELECT DISTINCT m.sku, 0 FROM inventory_movements m
WHERE NOT EXISTS (SELECT 1 FROM inventory_levels l WHERE l.sku = m.sku)
ORDER BY m.sku
ON CONFLICT (sku) DO NOTHING;

-- What the consumer's database role needs when another role owns the schema, as in
-- deploy/k8s (the intentflow-migrate Secret's role migrates, the order-consumer
-- Secret's role reads and writes rows). Run it once, as the owning role, in the
-- intentflow database, before the first migration or after it; replace
-- order_consumer with the consumer's role. The default privileges cover the tables
-- that migrations create later, so that an upgrade does not lock the consumer out.
--   psql "$OWNER_DATABASE_URL" -v ON_ERROR_STOP=1 -f deploy/grants.sql
GRANT USAGE ON SCHEMA public TO order_consumer;
GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO order_consumer;
GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA public TO order_consumer;
ALTER DEFAULT PRIVILEGES IN SCHEMA public
    GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES TO order_consumer;
ALTER DEFAULT PRIVILEGES IN SCHEMA public
    GRANT USAGE, SELECT ON SEQUENCES TO order_consumer;

-- The lease columns of the Postgres schema, so both schemas stay the same. SQLite mirrors are
-- single-process (`run --worker` needs Postgres), so these stay empty here.
ALTER TABLE sync_state ADD COLUMN lease_owner TEXT;
ALTER TABLE sync_state ADD COLUMN lease_until TEXT;

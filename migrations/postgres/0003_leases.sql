-- Workers (`stac-sync run --worker`) share a job's planned partitions through this table: a
-- worker claims an unfinished partition by setting its lease (SELECT ... FOR UPDATE SKIP
-- LOCKED), renews the lease while it pages, and every page commit checks the lease is still its
-- own. A worker that dies stops renewing; once lease_until passes, another worker claims the
-- partition and goes on from its committed resume point.
ALTER TABLE sync_state ADD COLUMN lease_owner TEXT;        -- the run id of the worker holding it
ALTER TABLE sync_state ADD COLUMN lease_until TIMESTAMPTZ; -- database time; expired = claimable

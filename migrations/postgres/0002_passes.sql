-- Passes are planned once and stored, so a killed run resumes exactly the partitions it planned
-- (partitions depend on the watermark and the calendar, which move between runs).
--
-- sync_state now holds two kinds of rows per job:
--   kind 'job':  partition '', the job's search fingerprint (query_hash), its watermark
--                (RFC 3339, UTC), when the current sync pass was planned, when it was last reconciled;
--   kind 'sync' / 'reconcile': one row per planned partition of an unfinished pass, with its
--                first request, its resume point and whether it is done. Removed when the pass ends.
-- Rows from before this migration (kind NULL) are discarded when the next pass is planned.
ALTER TABLE sync_state ADD COLUMN kind TEXT;
ALTER TABLE sync_state ADD COLUMN collection TEXT;
ALTER TABLE sync_state ADD COLUMN request TEXT;            -- JSON of the partition's first request
ALTER TABLE sync_state ADD COLUMN done BOOLEAN NOT NULL DEFAULT FALSE;
ALTER TABLE sync_state ADD COLUMN pass_started_at TEXT;    -- job row: the current sync pass's start
ALTER TABLE sync_state ADD COLUMN reconciled_at TEXT;      -- job row: the last completed reconcile

-- The ids a reconcile pass has seen so far; what is stored in its scope but not seen was
-- deleted upstream. Committed with each page, so a killed reconcile resumes.
CREATE TABLE sync_seen (
    job        TEXT NOT NULL,
    collection TEXT NOT NULL,
    id         TEXT NOT NULL,
    PRIMARY KEY (job, collection, id)
);

-- sync_runs.status gains 'abandoned': a run that was still 'running' when the next run of its
-- job took the lock (the process was killed before it could record its end).

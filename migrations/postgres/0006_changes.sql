-- The change feed: what each commit did, inserted in the same transaction as the rows.
-- change: 'new', 'changed' (including an item back after it was deleted) or 'deleted'.
--
-- A consumer keeps the last seq it read as its cursor, so no change may get a seq below one
-- already visible. Writers commit concurrently, so a change's seq is not given when it is
-- inserted: right after each commit, the writer numbers every change still without one, in
-- a short transaction under an advisory lock (one numbering at a time). A change becomes
-- visible in the feed only once numbered, and numbers only grow. A writer killed between its
-- commit and the numbering leaves its changes to the next numbering.
CREATE SEQUENCE changes_seq;
CREATE TABLE changes (
    change_id    BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    seq          BIGINT UNIQUE,
    run_id       TEXT NOT NULL,
    job          TEXT NOT NULL,
    collection   TEXT NOT NULL,
    id           TEXT NOT NULL,
    change       TEXT NOT NULL,
    content_hash TEXT,
    at           TIMESTAMPTZ NOT NULL
);
CREATE INDEX changes_unnumbered ON changes (change_id) WHERE seq IS NULL;
CREATE INDEX changes_run ON changes (run_id);
CREATE INDEX changes_at ON changes (at);

-- Where each webhook's delivery of the feed stands: the last seq it took.
CREATE TABLE webhook_state (
    url           TEXT PRIMARY KEY,
    delivered_seq BIGINT NOT NULL
);

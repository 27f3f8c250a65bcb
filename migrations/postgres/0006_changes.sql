-- The change feed: what each commit did, in the same transaction as the rows. Commits take a
-- transaction-level advisory lock before they insert here, so seq follows commit order: a
-- consumer that keeps the last seq it read as its cursor never skips a later-committed lower
-- seq. change: 'new', 'changed' (including an item back after it was deleted) or 'deleted'.
CREATE TABLE changes (
    seq          BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    run_id       TEXT NOT NULL,
    job          TEXT NOT NULL,
    collection   TEXT NOT NULL,
    id           TEXT NOT NULL,
    change       TEXT NOT NULL,
    content_hash TEXT,
    at           TIMESTAMPTZ NOT NULL
);
CREATE INDEX changes_run ON changes (run_id);
CREATE INDEX changes_at ON changes (at);

-- Where each webhook's delivery of the feed stands: the last seq it took.
CREATE TABLE webhook_state (
    url           TEXT PRIMARY KEY,
    delivered_seq BIGINT NOT NULL
);

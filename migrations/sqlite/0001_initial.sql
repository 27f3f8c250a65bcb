-- stac-sync schema (SQLite). Our timestamps are UTC text from CURRENT_TIMESTAMP
-- (YYYY-MM-DD HH:MM:SS); item-provided datetimes are kept as received.

-- The mirror: one row per (collection, id), the item JSON exactly as received.
CREATE TABLE items (
    collection     TEXT NOT NULL,
    id             TEXT NOT NULL,
    content        TEXT NOT NULL,
    content_hash   TEXT NOT NULL,           -- BLAKE3 of content, hex
    datetime       TEXT,
    start_datetime TEXT,
    end_datetime   TEXT,
    updated        TEXT,
    bbox_xmin REAL, bbox_ymin REAL, bbox_xmax REAL, bbox_ymax REAL,
    first_seen_at  TEXT NOT NULL,           -- when the row was first stored
    last_seen_at   TEXT NOT NULL,           -- when the row was last stored new or changed
    deleted_at     TEXT,                    -- tombstone: gone upstream (never a hard delete)
    PRIMARY KEY (collection, id)
);
CREATE INDEX items_datetime ON items (collection, datetime);
CREATE INDEX items_interval ON items (collection, start_datetime, end_datetime);
CREATE INDEX items_updated ON items (collection, updated);
CREATE INDEX items_bbox ON items (bbox_xmin, bbox_xmax, bbox_ymin, bbox_ymax);

-- One row per run of a job.
CREATE TABLE sync_runs (
    run_id            TEXT PRIMARY KEY,
    job               TEXT NOT NULL,
    started_at        TEXT NOT NULL,
    finished_at       TEXT,
    status            TEXT NOT NULL,        -- running, succeeded, partial, failed, interrupted
    pages             INTEGER NOT NULL DEFAULT 0,
    items_new         INTEGER NOT NULL DEFAULT 0,
    items_changed     INTEGER NOT NULL DEFAULT 0,
    items_unchanged   INTEGER NOT NULL DEFAULT 0,
    items_deleted     INTEGER NOT NULL DEFAULT 0,
    items_quarantined INTEGER NOT NULL DEFAULT 0,
    items_duplicate   INTEGER NOT NULL DEFAULT 0, -- same (collection, id) twice in one page
    retries           INTEGER NOT NULL DEFAULT 0,
    token_renewals    INTEGER NOT NULL DEFAULT 0,
    error             TEXT
);
CREATE INDEX sync_runs_job ON sync_runs (job, started_at);

-- Per job and partition: the watermark and the durable resume point of an unfinished pass.
CREATE TABLE sync_state (
    job        TEXT NOT NULL,
    partition  TEXT NOT NULL,
    query_hash TEXT NOT NULL,               -- the search the resume point belongs to
    watermark  TEXT,
    resume     TEXT,                        -- JSON of the next request; NULL when the pass is done
    pages_done INTEGER NOT NULL DEFAULT 0,  -- pages committed in the current pass
    updated_at TEXT NOT NULL,
    PRIMARY KEY (job, partition)
);

-- Features that could not be stored, with the reason and the page they came from.
CREATE TABLE quarantine (
    seq            INTEGER PRIMARY KEY AUTOINCREMENT,
    run_id         TEXT NOT NULL,
    job            TEXT NOT NULL,
    collection     TEXT,
    item_id        TEXT,
    reason         TEXT NOT NULL,
    page_url       TEXT NOT NULL,
    content        TEXT NOT NULL,
    quarantined_at TEXT NOT NULL
);
CREATE INDEX quarantine_item ON quarantine (collection, item_id);

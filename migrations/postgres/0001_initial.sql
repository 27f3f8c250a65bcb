-- stac-sync schema (Postgres): the same tables as SQLite; item content as JSONB and our own
-- timestamps as timestamptz. Item-provided datetimes stay text, as received (RFC 3339).

CREATE TABLE items (
    collection     TEXT NOT NULL,
    id             TEXT NOT NULL,
    content        JSONB COMPRESSION lz4 NOT NULL, -- lz4: several times faster than pglz
    content_hash   TEXT NOT NULL,             -- BLAKE3 of the bytes received, hex
    datetime       TEXT,
    start_datetime TEXT,
    end_datetime   TEXT,
    updated        TEXT,
    bbox_xmin DOUBLE PRECISION, bbox_ymin DOUBLE PRECISION, bbox_xmax DOUBLE PRECISION, bbox_ymax DOUBLE PRECISION,
    first_seen_at  TIMESTAMPTZ NOT NULL,
    last_seen_at   TIMESTAMPTZ NOT NULL,      -- when the row was last stored new or changed
    deleted_at     TIMESTAMPTZ,
    PRIMARY KEY (collection, id)
);
CREATE INDEX items_datetime ON items (collection, datetime);
CREATE INDEX items_interval ON items (collection, start_datetime, end_datetime);
CREATE INDEX items_updated ON items (collection, updated);
CREATE INDEX items_bbox ON items (bbox_xmin, bbox_xmax, bbox_ymin, bbox_ymax);

CREATE TABLE sync_runs (
    run_id            TEXT PRIMARY KEY,
    job               TEXT NOT NULL,
    started_at        TIMESTAMPTZ NOT NULL,
    finished_at       TIMESTAMPTZ,
    status            TEXT NOT NULL,
    pages             BIGINT NOT NULL DEFAULT 0,
    items_new         BIGINT NOT NULL DEFAULT 0,
    items_changed     BIGINT NOT NULL DEFAULT 0,
    items_unchanged   BIGINT NOT NULL DEFAULT 0,
    items_deleted     BIGINT NOT NULL DEFAULT 0,
    items_quarantined BIGINT NOT NULL DEFAULT 0,
    items_duplicate   BIGINT NOT NULL DEFAULT 0,
    retries           BIGINT NOT NULL DEFAULT 0,
    token_renewals    BIGINT NOT NULL DEFAULT 0,
    error             TEXT
);
CREATE INDEX sync_runs_job ON sync_runs (job, started_at);

CREATE TABLE sync_state (
    job        TEXT NOT NULL,
    partition  TEXT NOT NULL,
    query_hash TEXT NOT NULL,
    watermark  TEXT,
    resume     TEXT,
    pages_done BIGINT NOT NULL DEFAULT 0,
    updated_at TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (job, partition)
);

CREATE TABLE quarantine (
    seq            BIGSERIAL PRIMARY KEY,
    run_id         TEXT NOT NULL,
    job            TEXT NOT NULL,
    collection     TEXT,
    item_id        TEXT,
    reason         TEXT NOT NULL,
    page_url       TEXT NOT NULL,
    content        TEXT NOT NULL,
    quarantined_at TIMESTAMPTZ NOT NULL
);
CREATE INDEX quarantine_item ON quarantine (collection, item_id);

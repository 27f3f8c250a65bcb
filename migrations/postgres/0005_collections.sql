-- The collections of the mirrored jobs: each run fetches GET /collections/{id} once and stores
-- it here (and as {prefix}/{collection}/collection.json) when its content changed.
CREATE TABLE collections (
    id            TEXT PRIMARY KEY,
    content       JSONB NOT NULL,            -- the collection JSON as received
    content_hash  TEXT NOT NULL,             -- BLAKE3 of the bytes received, hex
    first_seen_at TIMESTAMPTZ NOT NULL,
    last_seen_at  TIMESTAMPTZ NOT NULL,      -- when a run last fetched it
    changed_at    TIMESTAMPTZ NOT NULL,      -- when its content last changed
    deleted_at    TIMESTAMPTZ                -- gone upstream (404); its items are kept
);

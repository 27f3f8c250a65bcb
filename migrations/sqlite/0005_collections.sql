-- The collections of the mirrored jobs: each run fetches GET /collections/{id} once and stores
-- it here (and as {prefix}/{collection}/collection.json) when its content changed.
CREATE TABLE collections (
    id            TEXT PRIMARY KEY,
    content       TEXT NOT NULL,             -- the collection JSON exactly as received
    content_hash  TEXT NOT NULL,             -- BLAKE3 of content, hex
    first_seen_at TEXT NOT NULL,
    last_seen_at  TEXT NOT NULL,             -- when a run last fetched it
    changed_at    TEXT NOT NULL,             -- when its content last changed
    deleted_at    TEXT                       -- gone upstream (404); its items are kept
);

-- An item's content_hash is XXH3-128 of the bytes received (32 hex digits) for rows stored
-- from this version on: every item received is hashed to know whether it changed, and XXH3-128
-- hashes an item several times faster than BLAKE3 (benches/content_hash.rs). Rows stored
-- before keep their BLAKE3 hash (64 hex digits), which stac-sync still compares, until their
-- item changes.
COMMENT ON COLUMN items.content_hash IS
    'XXH3-128 of the item''s bytes as received, hex (BLAKE3, 64 hex digits, for rows stored before stac-sync used XXH3-128)';

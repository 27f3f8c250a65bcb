-- Each item's stored hash, readable without its row: a page's items are classified (new,
-- changed, unchanged) by their hashes, and in `items` the hash and `deleted_at` come after
-- `content`, which is longer than a page of the file (15 KB for EDS items), so reading them from
-- the row reads the content's overflow pages too. An incremental run over a large mirror
-- classifies every item it pages. Building this index reads every row once.
CREATE INDEX items_hash ON items (collection, id, content_hash, deleted_at);

-- A snapshot window is read in pages ordered by datetime then id. With `items_datetime` on
-- (collection, datetime) alone SQLite sorts each page's rows by id in a temporary b-tree,
-- copying every item's content into it; with id in the index the rows come in order. Building
-- it reads every row's key once.
DROP INDEX items_datetime;
CREATE INDEX items_datetime ON items (collection, datetime, id);

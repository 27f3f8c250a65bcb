-- Snapshot files due to be rewritten: one row per (collection, datetime window) in which a
-- commit stored a new or changed item (its old window too, when its datetime moved) or a
-- tombstone, inserted in the same transaction as the rows. `marks` counts those commits: a
-- snapshot writer removes the row only if no commit marked it again while it wrote the file.
-- The window is named by the first 4 (year) or 7 (month) characters of the item's datetime
-- (or start_datetime), `undated` when those are not a date.
CREATE TABLE snapshot_due (
    collection TEXT NOT NULL,
    win        TEXT NOT NULL,
    marks      BIGINT NOT NULL DEFAULT 1,
    PRIMARY KEY (collection, win)
);

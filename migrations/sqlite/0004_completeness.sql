-- Completeness checks and adaptive partitions (sync_state rows of kind 'sync' / 'reconcile'):
--   matched:  the items the partition's first page said its search matches (numberMatched or
--             context.matched), if it said;
--   received: the features its committed pages held, compared with matched when it ends;
--   attempts: times it was paged again after falling short of matched;
--   split:    it was replaced by two partitions over the halves of its datetime window (too
--             many items for one search); done, and never resumed.
ALTER TABLE sync_state ADD COLUMN matched BIGINT;
ALTER TABLE sync_state ADD COLUMN received BIGINT NOT NULL DEFAULT 0;
ALTER TABLE sync_state ADD COLUMN attempts BIGINT NOT NULL DEFAULT 0;
ALTER TABLE sync_state ADD COLUMN split BOOLEAN NOT NULL DEFAULT FALSE;

-- Per run: items found missing by completeness checks, partitions still short after paging
-- them again (the run is partial), and partitions split.
ALTER TABLE sync_runs ADD COLUMN items_missing BIGINT NOT NULL DEFAULT 0;
ALTER TABLE sync_runs ADD COLUMN partitions_incomplete BIGINT NOT NULL DEFAULT 0;
ALTER TABLE sync_runs ADD COLUMN partitions_split BIGINT NOT NULL DEFAULT 0;

-- What a reconcile sweep saw of each item's `properties.updated` (where it asked for ids and
-- `updated` only): an item whose stored `updated` differs, or that is not stored, is fetched
-- whole again before the sweep ends.
ALTER TABLE sync_seen ADD COLUMN updated TEXT;

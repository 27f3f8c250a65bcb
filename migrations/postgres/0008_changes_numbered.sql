-- Every change is now numbered in the transaction that inserts it, under the feed's advisory
-- lock held to its commit (pages and reconcile's deletions alike), so there is no numbering
-- after a commit any more. Number what an earlier version left without a seq, in the order it
-- was inserted, and drop the index that found such changes.
SELECT pg_advisory_xact_lock(7263686167657300);
UPDATE changes c SET seq = n.seq
FROM (
    SELECT change_id, nextval('changes_seq') AS seq
    FROM (SELECT change_id FROM changes WHERE seq IS NULL ORDER BY change_id) o
) n
WHERE c.change_id = n.change_id;
DROP INDEX changes_unnumbered;

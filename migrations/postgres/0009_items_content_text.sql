-- In a pgstac database, stac-sync's own items keep their content as the text received, not
-- jsonb: pgstac's rows are the ones served and queried there, and nothing of stac-sync reads
-- its content as jsonb (every reader takes its text). For items of 15 KB, parsing into jsonb
-- took about two thirds of the server's time per item (186 µs against 62-72 µs for the same
-- rows into a text column). stac-sync's own format (schema public) keeps jsonb: its users
-- query it. The rows stored so far keep jsonb's text of their item; this rewrites the table
-- once.
DO $$
BEGIN
    IF current_schema() = 'stac_sync' THEN
        ALTER TABLE items ALTER COLUMN content TYPE TEXT USING CAST(content AS TEXT);
        ALTER TABLE items ALTER COLUMN content SET COMPRESSION lz4;
    END IF;
END
$$;

-- Who is uploading a part of this upload right now (object stores). A writer superseded by a
-- newer request may still be mid-upload of a part; the newer writer waits for it to finish
-- before it uploads the same part number, so the last upload of a part is always the newest
-- writer's.
ALTER TABLE uploads ADD COLUMN part_writer BIGINT;        -- the generation holding the claim
ALTER TABLE uploads ADD COLUMN part_writer_until BIGINT;  -- the claim lapses then (a crashed writer)

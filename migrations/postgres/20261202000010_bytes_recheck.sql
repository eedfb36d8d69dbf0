-- When the bytes of a terminated or expired upload are deleted a second time: a writer that was
-- already sending when they were first deleted may still land a part or a block afterwards
-- (Azure keeps such a block uncommitted for a week; local disk would recreate the file).
-- NULL once the second deletion is done; the tombstone is kept until then.
ALTER TABLE uploads ADD COLUMN bytes_recheck_at BIGINT;
CREATE INDEX uploads_bytes_recheck ON uploads (bytes_recheck_at) WHERE bytes_recheck_at IS NOT NULL;

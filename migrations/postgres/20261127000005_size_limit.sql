-- A smaller size limit for this upload than --max-size (from an upload token or the pre-create hook),
-- enforced on every append, also while the length is deferred.
ALTER TABLE uploads ADD COLUMN size_limit BIGINT;

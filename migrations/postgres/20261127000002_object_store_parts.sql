-- Bookkeeping for object stores (S3, GCS, Azure): appends go straight into a native multipart
-- upload whose id and parts live here, so any instance can add the next part or complete it.
ALTER TABLE uploads ADD COLUMN multipart_id TEXT;
ALTER TABLE uploads ADD COLUMN part_size BIGINT;   -- every part but the last has exactly this size

-- Parts of the multipart upload, in order (part_index 0 covers [0, part_size)).
CREATE TABLE upload_parts (
    upload_id  UUID NOT NULL REFERENCES uploads (id) ON DELETE CASCADE,
    part_index BIGINT NOT NULL CHECK (part_index >= 0),
    size       BIGINT NOT NULL CHECK (size > 0),
    content_id TEXT NOT NULL,                       -- the store's id of the part (ETag)
    PRIMARY KEY (upload_id, part_index)
);

-- Bytes that arrived in chunks smaller than a part, staged as objects of their own until the
-- next append merges them into a part.
CREATE TABLE upload_staged (
    upload_id    UUID NOT NULL REFERENCES uploads (id) ON DELETE CASCADE,
    chunk_offset BIGINT NOT NULL CHECK (chunk_offset >= 0),
    size         BIGINT NOT NULL CHECK (size > 0),
    object_key   TEXT NOT NULL,
    PRIMARY KEY (upload_id, chunk_offset)
);

-- Uploads: metadata, offsets and the state each instance needs to continue any upload.
-- Timestamps are milliseconds since the Unix epoch (the same in the SQLite schema).
CREATE TABLE uploads (
    id            UUID PRIMARY KEY,
    length        BIGINT CHECK (length >= 0),          -- NULL while the length is deferred
    upload_offset BIGINT NOT NULL DEFAULT 0 CHECK (upload_offset >= 0),
    metadata      TEXT NOT NULL,                       -- JSON array of [key, base64 value or null]
    state         TEXT NOT NULL CHECK (state IN ('receiving', 'completing', 'completed', 'terminated', 'expired')),
    concat        TEXT CHECK (concat IN ('partial', 'final')),
    concat_parts  TEXT,                                -- JSON array of partial upload ids (final uploads)
    hash_state    BYTEA NOT NULL,                      -- serialized SHA-256 state at upload_offset
    sha256        BYTEA,                               -- set once complete
    owner         TEXT,
    write_gen     BIGINT NOT NULL DEFAULT 0,           -- bumped by every append; the newest writer wins
    bytes_deleted BOOLEAN NOT NULL DEFAULT FALSE,      -- terminated/expired uploads whose bytes are gone
    claimed_until BIGINT,                              -- lease of the background job assembling it
    created_at    BIGINT NOT NULL,
    updated_at    BIGINT NOT NULL,
    expires_at    BIGINT,
    CHECK (length IS NULL OR upload_offset <= length)
);

CREATE INDEX uploads_expiring ON uploads (expires_at) WHERE state = 'receiving';
CREATE INDEX uploads_completing ON uploads (claimed_until) WHERE state = 'completing';
CREATE INDEX uploads_gone ON uploads (updated_at) WHERE state IN ('terminated', 'expired');

-- A final (concatenated) upload is read from its partial uploads' objects, in order: its
-- creation copies nothing. A partial's bytes stay while a final upload that is not gone uses
-- them, also after the partial itself was terminated.
CREATE TABLE upload_pieces (
    final_id     UUID NOT NULL REFERENCES uploads (id) ON DELETE CASCADE,
    position     INTEGER NOT NULL CHECK (position >= 0),
    part_id      UUID NOT NULL,                -- the partial upload (no foreign key: see above)
    start_offset BIGINT NOT NULL CHECK (start_offset >= 0),  -- where in the final upload it begins
    size         BIGINT NOT NULL CHECK (size >= 0),
    key_prefix   TEXT,                        -- where the partial's object is, as for uploads
    PRIMARY KEY (final_id, position)
);
CREATE INDEX upload_pieces_part ON upload_pieces (part_id);

-- Final uploads are complete at once; their whole-file SHA-256 is computed by a background job,
-- which finds them here (claimed_until is its lease).
CREATE INDEX uploads_digest_due ON uploads (claimed_until) WHERE state = 'completed' AND sha256 IS NULL;

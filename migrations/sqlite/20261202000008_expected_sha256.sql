-- The SHA-256 a client announced for the whole upload at creation (the IETF protocol's
-- Repr-Digest), checked when the last byte arrives.
ALTER TABLE uploads ADD COLUMN expected_sha256 BLOB;

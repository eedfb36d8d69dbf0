-- Where in the store an upload's object goes: <prefix>uploads/... becomes uploads/<key_prefix><id>,
-- as the pre-create hook asked (say, one folder per user).
ALTER TABLE uploads ADD COLUMN key_prefix TEXT;

-- How many staged objects an upload has, kept by each append's commit, so that an append looks
-- them up only when there are some (local disk never stages).
ALTER TABLE uploads ADD COLUMN staged_count INTEGER NOT NULL DEFAULT 0;
UPDATE uploads SET staged_count = (SELECT count(*) FROM upload_staged s WHERE s.upload_id = uploads.id);

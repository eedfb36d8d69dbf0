-- Transactional outbox: an upload's state change and the event it causes commit together; a
-- dispatcher on every instance delivers events to the webhook URL until the receiver accepts.
CREATE TABLE events (
    seq             INTEGER PRIMARY KEY AUTOINCREMENT, -- delivery order
    id              TEXT NOT NULL UNIQUE,            -- webhook-id, stable across redeliveries
    upload_id       BLOB NOT NULL,
    event_type      TEXT NOT NULL,
    payload         TEXT NOT NULL,                   -- the JSON body, fixed when the event happened
    created_at      INTEGER NOT NULL,
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_attempt_at INTEGER NOT NULL,
    claimed_until   INTEGER,                          -- lease of the instance delivering it
    delivered_at    INTEGER,
    dead_at         INTEGER,                          -- gave up (retry budget spent, or the receiver said 410)
    last_error      TEXT
);

CREATE INDEX events_pending ON events (next_attempt_at) WHERE delivered_at IS NULL AND dead_at IS NULL;
CREATE INDEX events_by_upload ON events (upload_id, seq);

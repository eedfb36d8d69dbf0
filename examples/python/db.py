"""The SQLite database shared by the web app (app.py) and the queue consumer (worker.py)."""

import sqlite3
import time

SCHEMA = """
-- The inbox. ferry delivers each event at least once, so the same webhook-id can arrive twice
-- (a retry after a lost 2xx, a timeout, a restart); the UNIQUE constraint keeps one row per event
-- however often it came. Rows with processed_at NULL are the queue that worker.py consumes, in
-- arrival order (seq), which is ferry's order for the events of one upload.
CREATE TABLE IF NOT EXISTS events (
    seq          INTEGER PRIMARY KEY AUTOINCREMENT,
    webhook_id   TEXT NOT NULL UNIQUE,
    type         TEXT NOT NULL,
    upload_id    TEXT,
    owner        TEXT,
    payload      TEXT NOT NULL,               -- the verified JSON body
    received_at  TEXT NOT NULL,
    deliveries   INTEGER NOT NULL DEFAULT 1,  -- how many times ferry sent it
    processed_at TEXT
);
CREATE INDEX IF NOT EXISTS events_pending ON events (seq) WHERE processed_at IS NULL;

-- What the worker makes of the events: the app's own record of its users' files.
CREATE TABLE IF NOT EXISTS files (
    upload_id  TEXT PRIMARY KEY,
    owner      TEXT,
    filename   TEXT,
    size       INTEGER,
    sha256     TEXT,
    location   TEXT,
    url        TEXT,
    status     TEXT NOT NULL,  -- uploading | completed | terminated | expired
    updated_at TEXT NOT NULL
);

-- Test mode only (FERRY_EXAMPLE_TEST_MODE=1): how the webhook endpoint misbehaves for its next
-- requests. In the database rather than in memory because gunicorn runs several processes.
CREATE TABLE IF NOT EXISTS test_behaviour (
    id        INTEGER PRIMARY KEY CHECK (id = 1),
    status    INTEGER,                -- answer this instead of handling the event
    sleep     REAL NOT NULL DEFAULT 0,
    remaining INTEGER                 -- requests still affected; NULL: until reset
);
"""


def connect(path):
    # Autocommit (isolation_level=None): every statement is its own transaction unless we say
    # BEGIN. The timeout waits for the other process's write lock instead of failing at once.
    conn = sqlite3.connect(path, timeout=10, isolation_level=None)
    conn.row_factory = sqlite3.Row
    return conn


def init(path, attempts=50):
    # Every gunicorn worker runs this as it boots, at the same moment. Switching a new database
    # to WAL takes an exclusive lock for which SQLite does not wait (the busy timeout does not
    # apply): the loser gets "database is locked" at once, so it tries again shortly.
    for attempt in range(attempts):
        conn = connect(path)
        try:
            # WAL lets the web workers insert while worker.py reads.
            conn.execute("PRAGMA journal_mode=WAL")
            conn.executescript(SCHEMA)
            return
        except sqlite3.OperationalError as e:
            if "locked" not in str(e) or attempt + 1 == attempts:
                raise
        finally:
            conn.close()
        time.sleep(0.02 * (attempt + 1))

"""The queue consumer: works through the events that app.py recorded, oldest first.

    APP_DB=ferry-example.sqlite3 python worker.py          # runs until stopped
    APP_DB=ferry-example.sqlite3 python worker.py --once   # handles what is pending, then exits

Run one worker process. (Several would be safe, since each event is claimed under SQLite's write
lock, but they would take turns.) A bigger app would put a real queue (RQ, Celery...) behind the
same webhook endpoint; the receiving side stays as it is.
"""

import json
import logging
import os
import sys
import time
from datetime import datetime, timezone

import db

log = logging.getLogger("worker")


def handle(conn, kind, data):
    """Apply one event to the app's records. Written so that applying it twice changes nothing."""
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    if kind == "upload.created":
        conn.execute(
            """INSERT INTO files (upload_id, owner, filename, size, status, updated_at)
               VALUES (?, ?, ?, ?, 'uploading', ?) ON CONFLICT (upload_id) DO NOTHING""",
            (data["id"], data.get("owner"), (data.get("metadata") or {}).get("filename"), data.get("size"), now),
        )
    elif kind == "upload.completed":
        # The real work of an app goes here: scan the file, make a thumbnail, tell the user. It may
        # take minutes, and that is fine here, outside any web request.
        conn.execute(
            """INSERT INTO files (upload_id, owner, filename, size, sha256, location, url, status, updated_at)
               VALUES (:id, :owner, :filename, :size, :sha256, :location, :url, 'completed', :now)
               ON CONFLICT (upload_id) DO UPDATE SET size = :size, sha256 = :sha256, location = :location,
                   url = :url, status = 'completed', updated_at = :now""",
            {
                "id": data["id"],
                "owner": data.get("owner"),
                "filename": (data.get("metadata") or {}).get("filename"),
                "size": data.get("size"),
                "sha256": data.get("sha256"),
                "location": data.get("location"),
                "url": data.get("url"),
                "now": now,
            },
        )
        log.info(
            "file ready: %s (%s bytes, sha256 %s) at %s",
            data["id"],
            data.get("size"),
            data.get("sha256"),
            data.get("location"),
        )
    elif kind in ("upload.terminated", "upload.expired"):
        status = kind.split(".")[1]
        conn.execute("UPDATE files SET status = ?, updated_at = ? WHERE upload_id = ?", (status, now, data["id"]))
    else:
        log.info("ignoring an event of unknown type %r", kind)  # newer ferry, older app


def process_one(conn):
    """Handle the oldest pending event; False when there is none.

    The event's effects and its processed mark commit in one transaction, so a worker killed
    half-way leaves the event pending and it is handled again, whole, next time. Effects outside
    this database (an e-mail, a file in S3) cannot join the transaction: make them idempotent too.
    """
    conn.execute("BEGIN IMMEDIATE")  # take the write lock first: no other worker claims this event
    try:
        row = conn.execute(
            "SELECT seq, type, payload FROM events WHERE processed_at IS NULL ORDER BY seq LIMIT 1"
        ).fetchone()
        if row is None:
            conn.execute("ROLLBACK")
            return False
        handle(conn, row["type"], json.loads(row["payload"]).get("data") or {})
        conn.execute(
            "UPDATE events SET processed_at = ? WHERE seq = ?",
            (datetime.now(timezone.utc).isoformat(timespec="seconds"), row["seq"]),
        )
        conn.execute("COMMIT")
        return True
    except BaseException:
        conn.execute("ROLLBACK")
        raise


def process_pending(conn):
    count = 0
    while process_one(conn):
        count += 1
    return count


def main():
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    path = os.environ.get("APP_DB", "ferry-example.sqlite3")
    db.init(path)
    conn = db.connect(path)
    if "--once" in sys.argv[1:]:
        log.info("handled %d events", process_pending(conn))
        return
    log.info("waiting for events in %s", path)
    while True:
        try:
            if process_one(conn):
                continue
        except Exception:
            # The event stays pending and is tried again: fix the bug and the queue moves on.
            log.exception("an event failed; trying again shortly")
        time.sleep(1)


if __name__ == "__main__":
    main()

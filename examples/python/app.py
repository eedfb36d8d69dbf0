"""A Flask app that lets its users upload large files through ferry.

The file bytes never pass through this app (nor through gunicorn or the proxies in front of it):
the browser sends them to ferry in small chunks. The app only does what it knows best:
  - decide who may upload what (the pre-create hook, or an upload token it signs),
  - learn that a file is ready (webhooks from ferry, verified, deduplicated and queued).

Run it with `gunicorn -c gunicorn.conf.py` (see README.md).
"""

import hmac
import json
import os
import time
import urllib.error
import urllib.request
from datetime import datetime, timezone

import jwt
from flask import Flask, abort, g, redirect, render_template, request, session, url_for
from itsdangerous import BadSignature
from standardwebhooks import Webhook, WebhookVerificationError
from werkzeug.http import parse_cookie

import db

MiB = 1024 * 1024

# DEMO ONLY: hard-coded users with plain-text passwords. A real app has its own user store.
USERS = {
    "alice": {"password": "alice", "max_size": 1024 * MiB},
    "bob": {"password": "bob", "max_size": 1 * MiB},
}


def now_iso():
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def create_app(config=None):
    app = Flask(__name__)
    app.config.from_mapping(
        SECRET_KEY=os.environ.get("APP_SECRET_KEY"),
        FERRY_WEBHOOK_SECRET=os.environ.get("FERRY_WEBHOOK_SECRET"),  # whsec_..., as given to ferry
        FERRY_TOKEN_SECRET=os.environ.get("FERRY_TOKEN_SECRET"),  # ferry's --token-secret
        APP_DB=os.environ.get("APP_DB", "ferry-example.sqlite3"),
        FERRY_URL=os.environ.get("FERRY_URL", "http://127.0.0.1:8080"),
        TEST_MODE=os.environ.get("FERRY_EXAMPLE_TEST_MODE") == "1",
        TOKEN_TTL=15 * 60,  # seconds; the page fetches a new token before this runs out
        SESSION_COOKIE_SAMESITE="Lax",
    )
    app.config.update(config or {})
    missing = [k for k in ("SECRET_KEY", "FERRY_WEBHOOK_SECRET", "FERRY_TOKEN_SECRET") if not app.config[k]]
    if missing:
        raise RuntimeError("missing configuration: " + ", ".join(missing))

    webhook = Webhook(app.config["FERRY_WEBHOOK_SECRET"])
    db.init(app.config["APP_DB"])

    def get_db():
        if "db" not in g:
            g.db = db.connect(app.config["APP_DB"])
        return g.db

    @app.teardown_appcontext
    def close_db(_exc):
        conn = g.pop("db", None)
        if conn is not None:
            conn.close()

    # ---- the demo login ---------------------------------------------------------------------

    @app.get("/")
    def index():
        user = session.get("user")
        files = []
        if user:
            files = get_db().execute("SELECT * FROM files WHERE owner = ? ORDER BY updated_at DESC", (user,)).fetchall()
        return render_template("upload.html", user=user, files=files, ferry_url=app.config["FERRY_URL"])

    @app.post("/login")
    def login():
        name = request.form.get("username", "")
        password = request.form.get("password", "")
        known = USERS.get(name)
        if known is None or not hmac.compare_digest(known["password"], password):
            return render_template("upload.html", user=None, error="wrong user name or password"), 401
        session["user"] = name
        return redirect(url_for("index"), 303)

    @app.post("/logout")
    def logout():
        session.clear()
        return redirect(url_for("index"), 303)

    # ---- who may upload -----------------------------------------------------------------------

    @app.post("/upload-token")
    def upload_token():
        """A short-lived JWT that ferry checks by itself on every tus request (no round trip)."""
        user = session.get("user")
        if user is None:
            return {"message": "log in to upload"}, 401
        expires_at = int(time.time()) + app.config["TOKEN_TTL"]
        max_size = USERS[user]["max_size"]
        claims = {"sub": user, "exp": expires_at, "max_size": max_size}
        token = jwt.encode(claims, app.config["FERRY_TOKEN_SECRET"], algorithm="HS256")
        return {"token": token, "expires_at": expires_at, "max_size": max_size}

    @app.get("/files/<upload_id>/download")
    def download(upload_id):
        """Sends the logged-in owner of a file to a fresh signed download link from ferry.

        ferry's links expire (its --download-link-ttl), so the app asks for one when the user
        clicks, with a one-minute token of the user's: ferry checks that the upload is theirs. The
        bytes then go from ferry to the browser; none pass through this app.
        """
        user = session.get("user")
        if user is None:
            abort(401)
        row = get_db().execute(
            "SELECT url FROM files WHERE upload_id = ? AND owner = ? AND status = 'completed'", (upload_id, user)
        ).fetchone()
        if row is None or not row["url"]:
            abort(404)
        claims = {"sub": user, "exp": int(time.time()) + 60}
        token = jwt.encode(claims, app.config["FERRY_TOKEN_SECRET"], algorithm="HS256")
        ask = urllib.request.Request(row["url"] + "/link", headers={"Authorization": f"Bearer {token}"})
        try:
            with urllib.request.urlopen(ask, timeout=5) as answer:
                link = json.load(answer)["url"]
        except urllib.error.HTTPError as e:
            if e.code in (404, 410):  # deleted or expired in ferry meanwhile
                abort(404)
            app.logger.warning("ferry refused a download link for %s: %s", upload_id, e)
            abort(502)
        except (urllib.error.URLError, TimeoutError, ValueError, KeyError) as e:
            app.logger.warning("no download link from ferry for %s: %s", upload_id, e)
            abort(503)
        return redirect(link, 303)

    def user_from_token(token):
        claims = jwt.decode(
            token,
            app.config["FERRY_TOKEN_SECRET"],
            algorithms=["HS256"],  # fixed here, never taken from the token
            options={"require": ["sub", "exp"]},
        )
        return claims["sub"]

    def user_from_cookie(cookie_header):
        """The user of a Flask session cookie that the browser sent to ferry and ferry forwarded."""
        value = parse_cookie(cookie_header).get(app.config["SESSION_COOKIE_NAME"])
        if not value:
            return None
        serializer = app.session_interface.get_signing_serializer(app)
        max_age = int(app.permanent_session_lifetime.total_seconds())
        return serializer.loads(value, max_age=max_age).get("user")

    @app.post("/hooks/pre-create")
    def pre_create():
        """ferry asks, before it creates an upload, whether the uploading client may.

        200 allows (with the owner and metadata ferry records); a 4xx denies, and ferry passes the
        status and message on to the client. This is called while the client waits, so it must be
        quick: a slow or absent answer makes ferry refuse the upload with 503.
        """
        try:
            # ferry signs the call like its webhooks (same secret): only ferry may ask.
            hook = webhook.verify(request.get_data(), request.headers)
        except WebhookVerificationError as e:
            app.logger.warning("refused a pre-create call: %s", e)
            return {"message": "this call is not signed by ferry"}, 401
        except ValueError:  # signed, but not JSON
            hook = None
        if not isinstance(hook, dict):
            return {"message": "expected a JSON object"}, 400
        headers = {k.lower(): v for k, v in (hook.get("headers") or {}).items()}

        scheme, _, token = headers.get("authorization", "").partition(" ")
        try:
            if scheme.lower() == "bearer" and token:
                user = user_from_token(token.strip())
            else:
                user = user_from_cookie(headers.get("cookie", ""))
        except (jwt.InvalidTokenError, BadSignature):
            return {"message": "your session or upload token is invalid or has expired: log in again"}, 401
        if user not in USERS:
            return {"message": "log in to upload"}, 401

        max_size = USERS[user]["max_size"]
        length = hook.get("length")  # None for a deferred length: ferry enforces max_size later
        if length is not None and length > max_size:
            return {"message": f"this file has {length} bytes; {user} may upload at most {max_size}"}, 413

        return {
            "owner": user,
            "metadata": {"uploaded_by": user},
            "key_prefix": f"{user}/",
            "max_size": max_size,
        }

    # ---- learning that a file is ready ---------------------------------------------------------

    @app.post("/webhooks/ferry")
    def ferry_webhook():
        """Receive one event from ferry: verify it, record it once, queue it, answer at once.

        The work (reading the file, thumbnails, e-mails...) happens in worker.py, not here: a sync
        gunicorn worker that stays busy longer than `timeout` (30 s) is killed and the caller sees
        a 502, which is how big uploads failed before ferry. ferry itself gives up on an answer
        after 10 s and delivers again later, so a slow handler would only produce retries.
        """
        if app.config["TEST_MODE"]:
            forced = take_test_behaviour(get_db())
            if forced is not None:
                return forced

        body = request.get_data()
        try:
            # Checks the HMAC over webhook-id, webhook-timestamp and the exact body bytes, and that
            # the timestamp is within 5 minutes (no replays of old captured requests).
            event = webhook.verify(body, request.headers)
        except (WebhookVerificationError, ValueError) as e:  # ValueError: malformed headers or body
            app.logger.warning("refused a webhook: %s", e)
            return {"message": "invalid signature"}, 400

        data = event.get("data") or {}
        # Idempotent on webhook-id: a redelivery only bumps the counter and is not queued again.
        # Answering 2xx to a duplicate matters: it tells ferry to stop sending it.
        get_db().execute(
            """INSERT INTO events (webhook_id, type, upload_id, owner, payload, received_at)
               VALUES (?, ?, ?, ?, ?, ?)
               ON CONFLICT (webhook_id) DO UPDATE SET deliveries = deliveries + 1""",
            (
                request.headers["webhook-id"],
                event.get("type", ""),
                data.get("id"),
                data.get("owner"),
                body.decode(),
                now_iso(),
            ),
        )
        return "", 204

    @app.get("/events")
    def events():
        """The events received, in arrival order: all of them in test mode, else the user's own."""
        query = "SELECT seq, webhook_id, type, upload_id, deliveries, received_at, processed_at FROM events"
        if app.config["TEST_MODE"]:
            rows = get_db().execute(query + " ORDER BY seq").fetchall()
        elif session.get("user"):
            rows = get_db().execute(query + " WHERE owner = ? ORDER BY seq", (session["user"],)).fetchall()
        else:
            return {"message": "log in to see your events"}, 401
        return {"events": [dict(row) for row in rows]}

    # ---- test mode: simulate a failing or slow receiver ----------------------------------------

    if app.config["TEST_MODE"]:

        @app.post("/test/behaviour")
        def set_test_behaviour():
            """{"status": 500, "sleep": 12, "count": 3}: the next 3 webhook requests sleep 12 s, then
            answer 500 without handling the event. Omit status to handle it normally after the
            sleep; omit count for "until changed"; {} restores normal behaviour."""
            wanted = request.get_json(silent=True)
            if not isinstance(wanted, dict):
                abort(400)
            get_db().execute(
                "INSERT OR REPLACE INTO test_behaviour (id, status, sleep, remaining) VALUES (1, ?, ?, ?)",
                (wanted.get("status"), float(wanted.get("sleep", 0)), wanted.get("count")),
            )
            return "", 204

    return app


def take_test_behaviour(conn):
    """Use up one request of the configured test behaviour; returns a response to send, or None."""
    row = conn.execute(
        """UPDATE test_behaviour SET remaining = remaining - 1
           WHERE id = 1 AND (remaining IS NULL OR remaining > 0)
           RETURNING status, sleep"""
    ).fetchone()
    if row is None:
        return None
    if row["sleep"]:
        time.sleep(row["sleep"])
    if row["status"] is not None:
        return {"message": "test mode: forced status"}, row["status"]
    return None

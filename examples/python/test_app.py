"""Unit tests of the example app, with Flask's test client; run `pytest` in this folder.

Webhooks are signed here with the standardwebhooks package, as ferry signs them.
"""

import base64
import json
import secrets
import time
import uuid
from datetime import datetime, timedelta, timezone

import jwt
import pytest
from standardwebhooks import Webhook

import db
import worker
from app import create_app

WEBHOOK_SECRET = "whsec_" + base64.b64encode(b"w" * 32).decode()
TOKEN_SECRET = "t" * 32


@pytest.fixture
def app(tmp_path):
    return create_app(
        {
            "SECRET_KEY": "test",
            "FERRY_WEBHOOK_SECRET": WEBHOOK_SECRET,
            "FERRY_TOKEN_SECRET": TOKEN_SECRET,
            "APP_DB": str(tmp_path / "app.sqlite3"),
            "TEST_MODE": True,
        }
    )


@pytest.fixture
def client(app):
    return app.test_client()


def event(kind="upload.completed", upload_id=None, **data):
    upload_id = upload_id or uuid.uuid4().hex
    return {
        "type": kind,
        "timestamp": "2026-01-01T00:00:00Z",
        "data": {
            "id": upload_id,
            "size": 11,
            "offset": 11,
            "sha256": "b94d27b9934d3e08a52e52d7da7dabfac484efe37a5380ee9088f7ace2efcde9",
            "metadata": {"filename": "hello.txt", "uploaded_by": "alice"},
            "owner": "alice",
            "location": f"s3://bucket/alice/{upload_id}",
            "url": f"http://127.0.0.1:8080/files/{upload_id}",
            "created_at": "2026-01-01T00:00:00Z",
            "completed_at": "2026-01-01T00:00:01Z",
            **data,
        },
    }


def signed(payload, *, webhook_id=None, at=None, secret=WEBHOOK_SECRET):
    """The body and headers ferry would send for payload."""
    body = json.dumps(payload)
    webhook_id = webhook_id or "evt_" + secrets.token_hex(16)
    at = at or datetime.now(timezone.utc)
    headers = {
        "webhook-id": webhook_id,
        "webhook-timestamp": str(int(at.timestamp())),
        "webhook-signature": Webhook(secret).sign(webhook_id, at, body),
        "content-type": "application/json",
    }
    return body, headers


def deliver(client, payload, **kwargs):
    body, headers = signed(payload, **kwargs)
    return client.post("/webhooks/ferry", data=body, headers=headers)


def received(client):
    return client.get("/events").get_json()["events"]


def login(client, user="alice"):
    response = client.post("/login", data={"username": user, "password": user})
    assert response.status_code == 303


# ---- webhooks ---------------------------------------------------------------------------------


def test_a_signed_webhook_is_accepted_and_queued(client):
    payload = event()
    response = deliver(client, payload, webhook_id="evt_" + "a" * 32)
    assert response.status_code == 204
    [row] = received(client)
    assert row["webhook_id"] == "evt_" + "a" * 32
    assert row["type"] == "upload.completed"
    assert row["upload_id"] == payload["data"]["id"]
    assert row["deliveries"] == 1
    assert row["processed_at"] is None  # queued, not handled in the request


def test_a_tampered_body_is_refused(client):
    body, headers = signed(event(size=11))
    response = client.post("/webhooks/ferry", data=body.replace('"size": 11', '"size": 12'), headers=headers)
    assert response.status_code == 400
    assert received(client) == []


def test_a_stale_timestamp_is_refused(client):
    response = deliver(client, event(), at=datetime.now(timezone.utc) - timedelta(minutes=10))
    assert response.status_code == 400
    assert received(client) == []


@pytest.mark.parametrize(
    "change",
    [
        {"webhook-signature": None},
        {"webhook-id": None},
        {"webhook-timestamp": "yesterday"},
        {"webhook-signature": "v1"},
        {"webhook-signature": "v1,not base64!"},
        {"webhook-signature": "v2,c2lnbmF0dXJl"},
    ],
)
def test_missing_or_malformed_headers_are_refused(client, change):
    body, headers = signed(event())
    headers.update(change)
    headers = {k: v for k, v in headers.items() if v is not None}
    assert client.post("/webhooks/ferry", data=body, headers=headers).status_code == 400


def test_another_secret_is_refused(client):
    other = "whsec_" + base64.b64encode(b"x" * 32).decode()
    assert deliver(client, event(), secret=other).status_code == 400


def test_during_rotation_one_matching_signature_of_two_is_enough(client):
    body, headers = signed(event())
    other = "whsec_" + base64.b64encode(b"x" * 32).decode()
    _, old = signed(event(), webhook_id=headers["webhook-id"], secret=other)
    headers["webhook-signature"] = old["webhook-signature"] + " " + headers["webhook-signature"]
    assert client.post("/webhooks/ferry", data=body, headers=headers).status_code == 204


def test_a_redelivery_is_accepted_but_handled_once(app, client):
    payload = event()
    assert deliver(client, payload, webhook_id="evt_" + "b" * 32).status_code == 204
    assert deliver(client, payload, webhook_id="evt_" + "b" * 32).status_code == 204
    [row] = received(client)
    assert row["deliveries"] == 2

    conn = db.connect(app.config["APP_DB"])
    assert worker.process_pending(conn) == 1
    assert deliver(client, payload, webhook_id="evt_" + "b" * 32).status_code == 204  # after handling too
    assert worker.process_pending(conn) == 0
    [file] = conn.execute("SELECT * FROM files").fetchall()
    assert (file["upload_id"], file["status"], file["size"]) == (payload["data"]["id"], "completed", 11)
    assert file["location"] == payload["data"]["location"]


def test_the_worker_follows_an_upload_through_its_events(app, client):
    upload_id = uuid.uuid4().hex
    for kind in ("upload.created", "upload.completed", "upload.terminated"):
        assert deliver(client, event(kind, upload_id)).status_code == 204
    deliver(client, event("upload.someday", upload_id))  # unknown types are accepted and skipped
    assert [e["type"] for e in received(client)] == [
        "upload.created",
        "upload.completed",
        "upload.terminated",
        "upload.someday",
    ]

    conn = db.connect(app.config["APP_DB"])
    assert worker.process_pending(conn) == 4
    assert conn.execute("SELECT status FROM files WHERE upload_id = ?", (upload_id,)).fetchone()[0] == "terminated"
    assert all(e["processed_at"] for e in received(client))


def test_test_mode_can_fail_the_next_deliveries(client):
    assert client.post("/test/behaviour", json={"status": 500, "count": 2}).status_code == 204
    payload = event()
    assert deliver(client, payload).status_code == 500
    assert deliver(client, payload).status_code == 500
    assert received(client) == []  # a failing receiver records nothing
    assert deliver(client, payload).status_code == 204


def test_test_mode_can_slow_the_receiver_down(client):
    client.post("/test/behaviour", json={"sleep": 0.3, "count": 1})
    started = time.monotonic()
    assert deliver(client, event()).status_code == 204  # slow, but handled
    assert time.monotonic() - started >= 0.3
    started = time.monotonic()
    assert deliver(client, event()).status_code == 204
    assert time.monotonic() - started < 0.3
    assert len(received(client)) == 2


def test_without_test_mode_there_is_no_test_endpoint_and_events_are_private(app, tmp_path):
    app = create_app({**app.config, "TEST_MODE": False})
    client = app.test_client()
    assert client.post("/test/behaviour", json={"status": 500}).status_code == 404
    assert client.get("/events").status_code == 401
    deliver(client, event(owner="alice"))
    deliver(client, event(owner="bob"))
    login(client, "bob")
    assert [e["type"] for e in received(client)] == ["upload.completed"]


# ---- pre-create hook ---------------------------------------------------------------------------


def pre_create(client, length=1000, **headers):
    hook = {"length": length, "metadata": {"filename": "a.txt"}, "concat": None, "headers": headers}
    body, signature = signed(hook, webhook_id="pre_" + secrets.token_hex(16))
    return client.post("/hooks/pre-create", data=body, headers=signature)


def session_cookie(client):
    return "session=" + client.get_cookie("session").value


def test_pre_create_allows_a_logged_in_user_by_cookie(client):
    login(client)
    cookie = session_cookie(client)
    response = pre_create(client.application.test_client(), cookie=cookie)  # ferry has no session
    assert response.status_code == 200
    assert response.get_json() == {
        "owner": "alice",
        "metadata": {"uploaded_by": "alice"},
        "key_prefix": "alice/",
        "max_size": 1024 * 1024 * 1024,
    }


def test_pre_create_allows_a_bearer_token(client):
    login(client, "bob")
    token = client.post("/upload-token").get_json()["token"]
    response = pre_create(client.application.test_client(), authorization=f"Bearer {token}")
    assert response.status_code == 200
    assert response.get_json()["owner"] == "bob"


def test_pre_create_allows_a_deferred_length(client):
    login(client)
    assert pre_create(client, length=None, cookie=session_cookie(client)).status_code == 200


def test_pre_create_denies_anonymous_uploads(client):
    response = pre_create(client)
    assert response.status_code == 401
    assert "log in" in response.get_json()["message"]


@pytest.mark.parametrize(
    "header",
    [
        "session=forged.value.signature",
        "session=",
    ],
)
def test_pre_create_denies_a_bad_cookie(client, header):
    assert pre_create(client, cookie=header).status_code == 401


@pytest.mark.parametrize(
    "claims, secret",
    [
        ({"sub": "alice", "exp": int(time.time()) + 60}, "another secret of thirty-two bytes"),
        ({"sub": "alice", "exp": int(time.time()) - 60}, TOKEN_SECRET),
        ({"sub": "alice"}, TOKEN_SECRET),
        ({"sub": "mallory", "exp": int(time.time()) + 60}, TOKEN_SECRET),
    ],
    ids=["forged", "expired", "no-expiry", "unknown-user"],
)
def test_pre_create_denies_a_bad_token(client, claims, secret):
    token = jwt.encode(claims, secret, algorithm="HS256")
    response = pre_create(client, authorization=f"Bearer {token}")
    assert response.status_code == 401
    assert response.get_json()["message"]


def test_pre_create_denies_a_file_over_the_users_limit(client):
    login(client, "bob")
    cookie = session_cookie(client)
    assert pre_create(client, length=1024 * 1024, cookie=cookie).status_code == 200
    response = pre_create(client, length=1024 * 1024 + 1, cookie=cookie)
    assert response.status_code == 413
    assert "at most 1048576" in response.get_json()["message"]


def test_pre_create_needs_a_json_object(client):
    at = datetime.now(timezone.utc)
    headers = {
        "webhook-id": "pre_1",
        "webhook-timestamp": str(int(at.timestamp())),
        "webhook-signature": Webhook(WEBHOOK_SECRET).sign("pre_1", at, "nope"),
    }
    assert client.post("/hooks/pre-create", data="nope", headers=headers).status_code == 400


def test_pre_create_refuses_calls_ferry_did_not_sign(client):
    login(client)
    hook = {"length": 10, "metadata": {}, "concat": None, "headers": {"cookie": session_cookie(client)}}
    unsigned = client.post("/hooks/pre-create", json=hook)
    assert unsigned.status_code == 401
    assert "not signed by ferry" in unsigned.get_json()["message"]
    other = "whsec_" + base64.b64encode(b"another secret, 32 bytes long!!").decode()
    body, headers = signed(hook, secret=other)
    assert client.post("/hooks/pre-create", data=body, headers=headers).status_code == 401
    body, headers = signed(hook)
    assert client.post("/hooks/pre-create", data=body, headers=headers).status_code == 200


# ---- upload tokens -----------------------------------------------------------------------------


def test_an_upload_token_names_the_user_its_limit_and_expiry(client):
    login(client, "bob")
    response = client.post("/upload-token")
    assert response.status_code == 200
    answer = response.get_json()
    claims = jwt.decode(answer["token"], TOKEN_SECRET, algorithms=["HS256"])
    assert claims["sub"] == "bob"
    assert claims["max_size"] == answer["max_size"] == 1024 * 1024
    assert claims["exp"] == answer["expires_at"]
    assert 800 < claims["exp"] - time.time() <= 900
    assert jwt.get_unverified_header(answer["token"])["alg"] == "HS256"


def test_no_upload_token_without_login(client):
    assert client.post("/upload-token").status_code == 401


# ---- the rest ----------------------------------------------------------------------------------


def test_login_and_the_page(client):
    assert b"Log in" in client.get("/").data
    assert client.post("/login", data={"username": "alice", "password": "bob"}).status_code == 401
    login(client)
    page = client.get("/").data.decode()
    assert "Logged in as alice" in page
    assert '"http://127.0.0.1:8080/files/"' in page


def test_missing_secrets_stop_the_app(tmp_path):
    with pytest.raises(RuntimeError, match="FERRY_WEBHOOK_SECRET"):
        create_app(
            {
                "SECRET_KEY": "x",
                "FERRY_WEBHOOK_SECRET": None,
                "FERRY_TOKEN_SECRET": "t" * 32,
                "APP_DB": str(tmp_path / "x"),
            }
        )


# ---- downloads --------------------------------------------------------------------------------


def completed_file(app, client, owner="alice"):
    """A completed upload of owner's, as the worker records it from ferry's webhook."""
    payload = event(owner=owner)
    assert deliver(client, payload).status_code == 204
    worker.process_pending(db.connect(app.config["APP_DB"]))
    return payload["data"]["id"]


def test_downloads_are_for_the_logged_in_owner(app, client):
    upload_id = completed_file(app, client, owner="bob")
    assert client.get(f"/files/{upload_id}/download").status_code == 401
    login(client, "alice")
    assert client.get(f"/files/{upload_id}/download").status_code == 404, "bob's file"
    assert client.get(f"/files/{uuid.uuid4().hex}/download").status_code == 404, "no such file"


def test_a_download_without_ferry_is_503_not_500(app, client):
    # The recorded URL points at a ferry that does not answer (nothing listens on port 9).
    upload_id = completed_file(app, client)
    conn = db.connect(app.config["APP_DB"])
    conn.execute("UPDATE files SET url = ? WHERE upload_id = ?", (f"http://127.0.0.1:9/files/{upload_id}", upload_id))
    conn.commit()
    login(client, "alice")
    assert client.get(f"/files/{upload_id}/download").status_code == 503

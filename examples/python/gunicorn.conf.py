# gunicorn settings for the example app: `gunicorn -c gunicorn.conf.py`.
import os

wsgi_app = "app:create_app()"  # the Flask application factory in app.py
bind = os.environ.get("APP_BIND", "127.0.0.1:8000")
workers = int(os.environ.get("WEB_CONCURRENCY", "2"))
worker_class = "sync"

# timeout is left at gunicorn's default, 30 s, on purpose. With sync workers it is how long a
# request may keep a worker busy before gunicorn kills it, which is where the 502s of the old
# upload endpoint came from (the "fix" then was raising it to 600 s). Behind ferry no request here
# lasts long: file bytes go to ferry, never through this app; the pre-create hook and the webhook
# endpoint only check, record and answer, and the slow work runs in worker.py. ferry also waits
# only 10 s for a webhook answer, well inside these 30 s.
# timeout = 30

accesslog = "-"

# No gunicornc control socket: its default path is one per user, so several instances of this app
# on one machine (as ferry's tests run them) would replace each other's.
control_socket_disable = True

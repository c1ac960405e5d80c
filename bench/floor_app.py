"""What a push costs before this server does anything: gunicorn's gevent worker with a bare Flask route,
and with a bare WSGI function (bench --ingest-floor). Both read the body and answer {"ok": true}."""
from flask import Flask, request

flask_app = Flask(__name__)
ANSWER = b'{"ok":true}\n'


@flask_app.post("/push-sse")
def push():
    request.get_data()
    return flask_app.response_class(ANSWER, mimetype="application/json")


def wsgi(environ, start_response):
    environ["wsgi.input"].read()
    start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(ANSWER)))])
    return [ANSWER]

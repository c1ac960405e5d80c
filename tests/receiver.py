"""A real HTTP server on a free loopback port that records what webhooks are sent, and answers as scripted."""
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest


class Receiver:
    """A real HTTP server on a free loopback port that records each request and answers as scripted."""

    def __init__(self):
        self.requests, self.script, self.lock = [], {}, threading.Lock()
        self.release = threading.Event()  # frees the requests left hanging
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                path, _, query = self.path.partition("?")
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                record = {"path": path, "query": query, "headers": dict(self.headers), "body": body,
                          "at": time.monotonic(), "status": None}
                with receiver.lock:
                    receiver.requests.append(record)
                    answers = receiver.script.get(path)
                    answer = answers.pop(0) if answers else 200
                if answer == "hang":  # accept, read, never answer
                    receiver.release.wait(30)
                    return
                status, headers, payload = (answer, {}, b"{}") if isinstance(answer, int) else answer
                record["status"] = status
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, args=(0.02,), name="receiver", daemon=True).start()

    @property
    def url(self):
        return f"http://127.0.0.1:{self.port}"

    def at(self, path):
        with self.lock:
            return [r for r in self.requests if r["path"] == path]

    def bodies(self, path):
        """Return the JSON bodies POSTed to `path`, in order."""
        return [r["body"] for r in self.at(path)]

    def close(self):
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver():
    receiver = Receiver()
    yield receiver
    receiver.close()

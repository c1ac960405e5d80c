"""What one client may hold of a worker: every answer but a stream ends within a deadline, and one
address holds at most a small share of the requests in progress and of the connections.

gunicorn's gevent worker serves WORKER_CONNECTIONS connections at once, one greenlet each, and
writes an answer with a blocking sendall that has no timeout: a client that asks and never
reads holds its connection for as long as it likes. 22 such clients pipelining a static file
took a pool of 20, and every push timed out for 85 s (issue 20). So here, as WSGI middleware
in front of the app:
- an answer not delivered within RESPONSE_TIMEOUT_S of its request is cut (the socket is shut
  down, so the blocked write fails and gunicorn closes the connection), counted once a minute;
- one address may have at most `per_client` requests in progress; past that it is answered
  429 at once and the connection is closed, so it cannot queue more behind it. Requests for
  the stream are capped per address where they are admitted (MAX_SUBSCRIBERS_PER_CLIENT), not
  here: 200 viewers behind one address connecting at once got 429 while their routes ran.
Both hold for every answer on every path, /gpu/stream's 401, 405 and 429 included: 12,000
pipelined requests there, never read, once kept 2.8 MB unsent past 150 s. Only an answer that
is a stream (its route marks the environ) is let go once it starts: it has caps and a kernel
send timeout of its own (stream/broadcaster.py, stream/routes.py). The connections themselves,
idle ones included, are counted by connections.py, which this tells when a request starts and ends.
"""
import json
import logging
import threading

from gpustats.access.connections import shut
from gpustats.background import Tally, counted
from gpustats.offload import gevent_running
from gpustats.stream.routes import STREAMING
from gpustats.web import client_key

log = logging.getLogger("gpustats")
STREAM_PATH = "/gpu/stream"
NAMED_PATHS = ("/api/", "/static/", "/push-sse", "/metrics", STREAM_PATH)  # cut answers are counted by these


def _timer(seconds, callback):
    """Call `callback` in `seconds` on the event loop (a thread without gevent); return what cancels it."""
    if gevent_running():
        from gevent import get_hub
        timer = get_hub().loop.timer(seconds)  # a libev timer: no greenlet, no allocation per tick
        timer.start(callback)
        return timer.close
    timer = threading.Timer(seconds, callback)
    timer.daemon = True
    timer.start()
    return timer.cancel


class ClientLimits:
    """WSGI middleware: a deadline on every answer but a stream, and a cap on each address's requests in progress."""

    def __init__(self, app, timeout_s, per_client, trusted_proxies, connections):
        self._app, self._timeout_s, self._per_client = app, timeout_s, per_client
        self._trusted = trusted_proxies
        self.connections = connections  # connections.Connections: gunicorn.conf.py hands it each connection
        self._lock = threading.Lock()
        self._in_progress = {}  # address -> requests being answered
        self._cut = Tally(lambda counts: log.warning(
            "cut answers not taken within RESPONSE_TIMEOUT_S (%g s): %s", timeout_s, counted(counts)))
        self._refused = Tally(lambda counts: log.warning(
            "refused requests from addresses that had %d in progress already: %s", per_client, counted(counts)))

    def __call__(self, environ, start_response):
        sock = environ.get("gunicorn.socket")
        if sock is None:
            return self._app(environ, start_response)
        address = None if environ.get("PATH_INFO") == STREAM_PATH else client_key(
            environ.get("REMOTE_ADDR"), environ.get("HTTP_X_FORWARDED_FOR"), self._trusted)
        if address is not None:
            with self._lock:
                held = self._in_progress.get(address, 0)
                if held < self._per_client:
                    self._in_progress[address] = held + 1
            if held >= self._per_client:
                self._refused.add("requests")
                return self._too_many(sock, held, start_response)
        cancel = _timer(self._timeout_s, lambda: self._cut_off(sock, environ.get("PATH_INFO", "")))
        self.connections.busy(sock)
        try:
            answer = self._app(environ, start_response)
        except BaseException:
            self._done(address, cancel, sock)
            raise
        if environ.get(STREAMING):
            # A real stream from here on: no deadline, not in progress; it is idle again if it ever ends.
            self._done(address, cancel)
            self.connections.streaming(sock)
            return Answer(answer, lambda: self.connections.idle(sock))
        return Answer(answer, lambda: self._done(address, cancel, sock))

    def close_idle(self):
        """On SIGTERM: end the keep-alive connections that wait for a next request, and the streams' after they end.

        Agents keep their connection 75 s between pushes (gunicorn.conf.py); gunicorn waits for
        each of them at a stop, so a deploy would wait out --graceful-timeout. Their read side is
        shut: the request being answered on a busy one is finished, and gunicorn closes it after.
        """
        self.connections.close_idle()

    def _cut_off(self, sock, path):
        self._cut.add(f"on {path}" if path.startswith(NAMED_PATHS) else "others")
        shut(sock)

    def _done(self, address, cancel, sock=None):
        cancel()
        if sock is not None:
            self.connections.idle(sock)
        if address is None:
            return  # a stream request: not counted in progress
        with self._lock:
            left = self._in_progress[address] - 1
            if left:
                self._in_progress[address] = left
            else:
                del self._in_progress[address]

    def _too_many(self, sock, held, start_response):
        body = json.dumps({"ok": False, "error": f"this address has {held} requests in progress already; "
                                                 "wait for their answers"}).encode()
        start_response("429 Too Many Requests", [("Content-Type", "application/json"), ("Retry-After", "1"),
                                                 ("Content-Length", str(len(body)))])
        # Then the connection is shut once this answer is written (gunicorn drops hop-by-hop headers such
        # as Connection: close): what was pipelined behind it and is already read fails at its first
        # write, instead of being parsed and refused one by one (3,000 such clients starved pushes).
        return Answer([body], lambda: shut(sock))


class Answer:
    """An app's answer whose close() also runs `done`, once, however the answer ended."""

    __slots__ = ("_answer", "_done")

    def __init__(self, answer, done):
        self._answer, self._done = answer, done

    def __iter__(self):
        return iter(self._answer)

    def close(self):
        done, self._done = self._done, None
        try:
            close = getattr(self._answer, "close", None)
            if close is not None:
                close()
        finally:
            if done is not None:
                done()

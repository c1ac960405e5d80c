"""What one address may hold of a worker's connections, idle and silent ones included, and which idle ones go first.

gunicorn's gevent worker serves WORKER_CONNECTIONS connections at once and keeps each 75 s while
it waits for a first or a next request (gunicorn.conf.py). In an independent attack 10,100
connections from one address, each sending one `GET /healthz` and then nothing, took the whole
pool: every push from elsewhere went unanswered for as long as the attacker kept them. A WSGI
middleware never sees a connection that sends nothing, so these are counted where gunicorn
accepts them (gunicorn.conf.py's post_worker_init wraps the worker's handle with `guard`):
- one address may hold at most `per_client` connections (a trusted proxy apart: nginx's
  `limit_conn` caps its clients, deploy/nginx.conf); past that a new one is answered 429 and
  closed at once;
- once open connections come within the reserve of the pool, the one idle longest is shut for
  each new one, so a push always finds a place;
each counted and logged once a minute. ClientLimits says when a request starts and ends.
Everything here runs on the worker's one event-loop thread, the SIGTERM handler included: no lock.
"""
import json
import logging
import socket
from collections import OrderedDict

from gpustats.background import Tally, counted
from gpustats.web import limit_key

log = logging.getLogger("gpustats")
# Streams may take 90 % of the pool (config.STREAM_SHARE); idle connections are shut from 95 % on,
# and at least this many places are kept free for the connections that come meanwhile.
RESERVE_SHARE, RESERVE_LEAST = 0.05, 2
_BODY = json.dumps({"ok": False, "error": "this address holds too many connections to this server already; "
                                          "close some or reuse them"}).encode()
REFUSAL = (b"HTTP/1.1 429 Too Many Requests\r\nContent-Type: application/json\r\nRetry-After: 5\r\n"
           b"Connection: close\r\nContent-Length: " + str(len(_BODY)).encode() + b"\r\n\r\n" + _BODY)


class Connections:
    """A worker's client connections: how many each address holds, and which wait idle, longest first."""

    def __init__(self, pool, per_client, trusted_proxies):
        self.per_client = per_client
        self._trusted = frozenset(trusted_proxies)
        self._closing_idle_above = pool - max(RESERVE_LEAST, int(pool * RESERVE_SHARE))
        self._open = {}  # socket -> the key of its address, None for a trusted proxy's
        self._held = {}  # key -> connections open
        self._idle = OrderedDict()  # sockets waiting for a first or next request, idle longest first
        self._busy = set()  # sockets answering a request other than a stream
        self._stopping = False  # SIGTERM came: a connection that goes idle from now on is ended at once
        self._last_refused = None
        self._refused = Tally(lambda counts: log.warning(
            "refused connections from addresses that held %d already (the last from %s): %s",
            per_client, self._last_refused, counted(counts)))
        self._closed_idle = Tally(lambda counts: log.warning(
            "closed the connections idle longest, %d of WORKER_CONNECTIONS (%d) being open: %s",
            self._closing_idle_above, pool, counted(counts)))

    def guard(self, handle):
        """Wrap gunicorn's `handle(listener, client, addr)`: admit or refuse each connection, forget it once closed."""
        def guarded(listener, client, addr):
            if not self.admit(client, addr[0] if isinstance(addr, tuple) else None):
                refuse(client)
                return
            try:
                handle(listener, client, addr)
            finally:
                self.forget(client)
        return guarded

    def admit(self, sock, address):
        """Count a new connection from `address`; return False if its address holds its share already."""
        key = None if not address or address in self._trusted else limit_key(address)
        if key is not None:
            held = self._held.get(key, 0)
            if held >= self.per_client:
                self._last_refused = key
                self._refused.add("connections")
                return False
            self._held[key] = held + 1
        self._open[sock] = key
        while len(self._open) > self._closing_idle_above and self._idle:
            oldest, _ = self._idle.popitem(last=False)
            self.forget(oldest)
            shut(oldest)  # its blocked read returns: gunicorn's keep-alive loop ends and closes it
            self._closed_idle.add("idle connections")
        self._idle[sock] = None  # before its first request it waits like a keep-alive one
        return True

    def forget(self, sock):
        """The connection is closed, or is being: it counts no more."""
        self._idle.pop(sock, None)
        self._busy.discard(sock)
        key = self._open.pop(sock, None)
        if key is not None:
            left = self._held[key] - 1
            if left:
                self._held[key] = left
            else:
                del self._held[key]

    def busy(self, sock):
        """A request on `sock` is being answered."""
        if sock in self._open:
            self._idle.pop(sock, None)
            self._busy.add(sock)

    def streaming(self, sock):
        """The answer on `sock` is a stream: neither idle nor busy (SIGTERM ends its reading side)."""
        self._busy.discard(sock)

    def idle(self, sock):
        """The answer on `sock` is done: it waits for a next request, the newest idle connection."""
        self._busy.discard(sock)
        if self._stopping:
            # Answered just as SIGTERM came (its client already had the answer): it ends now, or the
            # worker waits for its next request until --graceful-timeout.
            shut(sock, socket.SHUT_RD)
        elif sock in self._open:
            self._idle[sock] = None

    def close_idle(self):
        """On SIGTERM: shut the reading side of every connection not answering a request (idle ones, streams)."""
        self._stopping = True
        for sock in list(self._open):
            if sock not in self._busy:
                shut(sock, socket.SHUT_RD)


def refuse(sock):
    """Answer 429 without waiting and close: what the client sent is read first, so the close sends no reset."""
    try:
        sock.setblocking(False)
        sock.send(REFUSAL)
        sock.recv(65536)
    except OSError:
        pass  # its window is full, or it sent nothing yet: closed all the same
    finally:
        sock.close()


def shut(sock, how=socket.SHUT_RDWR):
    """End a connection's reading, writing or both: a read or write its greenlet waits on returns, and gunicorn closes it.

    The real socket's, not gevent's: gevent's own shutdown() throws EBADF into the greenlet waiting on
    it, and gunicorn logs that with a traceback ("Socket error processing request"), once per connection.
    """
    try:
        getattr(sock, "_sock", sock).shutdown(how)
    except OSError:
        pass  # gone already

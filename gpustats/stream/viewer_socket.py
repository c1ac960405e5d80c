"""A viewer's socket, so the broadcaster can write an event to it without waking the viewer.

gunicorn writes what a stream yields with a blocking sendall, framed as an HTTP/1.1 chunk.
A viewer written to here gets the same bytes: the broadcaster frames the event as gunicorn
would, and sends it only while the viewer's own greenlet is parked between writes, so the
two never interleave on the wire.
"""
import socket


class ViewerSocket:
    """Non-blocking and blocking sends on one viewer's connection, and whether its body is chunked."""

    __slots__ = ("chunked", "try_send", "send_all")

    def __init__(self, sock, chunked):
        raw = getattr(sock, "_sock", None)  # gevent's socket wraps the real one, which is non-blocking
        self.try_send = raw.send if raw is not None else (lambda data: sock.send(data, socket.MSG_DONTWAIT))
        self.send_all = sock.sendall  # under gevent it waits for room without blocking the loop
        self.chunked = chunked


def viewer_socket(environ):
    """Return the stream's ViewerSocket, or None where only gunicorn may write (no socket, TLS, HEAD)."""
    sock = environ.get("gunicorn.socket")
    if sock is None or hasattr(sock, "cipher") or environ.get("REQUEST_METHOD") != "GET":
        return None  # a TLS record cannot be sent in part and finished by another writer
    # gunicorn chunks every response body of HTTP/1.1 that has no Content-Length (http/wsgi.py, is_chunked).
    return ViewerSocket(sock, chunked=environ.get("SERVER_PROTOCOL") == "HTTP/1.1")

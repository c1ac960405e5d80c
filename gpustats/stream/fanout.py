"""Viewers parked between writes, caught up, and the pass that writes new events to them directly.

A viewer whose socket the broadcaster may write to (viewer_socket.py) parks here once it has
sent everything, instead of waiting on the condition. One fan-out greenlet then writes each
event to every parked viewer with one non-blocking send, framed as gunicorn would frame it:
no wake-up, generator step or gunicorn writer per viewer. A viewer is woken to write for
itself only when that is needed: its socket did not take the whole write, it fell a ring
behind, it is due a heartbeat, or the stream is reset or closed.

A viewer that asked for its events `every` so many seconds (`?every=` on the stream) is left
out of those passes; the pacer's pass at each whole second its `every` divides sends it what
came meanwhile in one write. Woken for a heartbeat, it writes what it has then. A browser's cost is per write it reads far more than per byte
(docs/PERFORMANCE.md, "The page in a browser"), so a page that shows changes once a second
asks for them once a second.

Every method but set_all() expects the broadcaster's lock to be held.
"""
import threading
from itertools import islice


class Viewer:
    """One parked stream: how to send to it, what it takes, and what it is owed once woken."""

    __slots__ = ("send", "chunked", "devices", "every", "seq", "last_write", "rest", "woken")

    def __init__(self, viewer_socket, devices, every=None):
        self.send, self.chunked, self.devices = viewer_socket.try_send, viewer_socket.chunked, devices
        self.every = every  # None: each pass writes to it; else only the pacer's, every so many seconds
        self.seq, self.last_write = 0, 0.0  # where it is, and when it was last written to
        self.rest = b""  # what a pass could not send at once: the viewer writes it before anything else
        self.woken = threading.Event()


def chunk(data):
    """Frame `data` as one HTTP/1.1 chunk, as gunicorn frames what a stream yields."""
    return b"%X\r\n%s\r\n" % (len(data), data)


def due(every, ticks):
    """Whether a viewer paced `every` seconds (None: not paced) is written to by a pass over `ticks`.

    `ticks` is None for the fan-out's passes, which follow publishing; for a pacer's pass, the whole
    seconds (after, up to] it covers: a viewer is due if one of them is a multiple of its `every`.
    """
    if ticks is None:
        return every is None
    return every is not None and ticks[1] // every > ticks[0] // every


def _send(viewers, data, now):
    """Send `data` to each viewer without waiting; return [(viewer, bytes sent)] for those it did not fit."""
    size, short = len(data), []
    for viewer in viewers:  # the hot loop: one send each, and no allocation
        try:
            sent = viewer.send(data)
        except OSError:  # full (BlockingIOError), or gone: its own write finds out which
            sent = 0
        if sent == size:
            viewer.last_write = now
        else:
            short.append((viewer, sent))
    return short


class ParkedViewers:
    """The parked viewers: those of the whole stream in groups by position, the filtered ones alone.

    Viewers of every device at one position get the same bytes, so they are kept together
    (keyed by (seq, chunked, every)) and their news is framed once per group. A pass sends to a
    bounded number of viewers at a time, so the fan-out can let pushes in between: a viewer
    always sits in the group of what it has been sent, and one that leaves while the pass
    waits is simply no longer there to be sent to.
    """

    def __init__(self, since, clock):
        self._since = since  # (seq, devices) -> ([frames after seq], head), or None past the ring
        self._clock = clock
        self._groups = {}  # (seq, chunked, every) -> {Viewer: None}, in the order they parked
        self._filtered = set()

    def prompt(self):
        """Whether a fan-out pass may have viewers to write to: paced ones wait for the pacer.

        Asked at every publish: a handful of groups to look at, and the filtered viewers as one.
        """
        return bool(self._filtered) or any(every is None for _, _, every in self._groups)

    def park(self, viewer, seq, last_write):
        """Add `viewer`, which has sent everything up to `seq`; it sleeps until woken."""
        viewer.seq, viewer.last_write = seq, last_write
        viewer.woken.clear()
        if viewer.devices is None:
            self._groups.setdefault((seq, viewer.chunked, viewer.every), {})[viewer] = None
        else:
            self._filtered.add(viewer)

    def leave(self, viewer):
        """Take out a viewer that stops waiting by itself (its stream closed or ended)."""
        if viewer.devices is not None:
            self._filtered.discard(viewer)
            return
        for key, group in self._groups.items():  # a handful of groups: one per position in use
            if viewer in group:
                del group[viewer]
                if not group:
                    del self._groups[key]
                return

    def write(self, head, budget, ticks=None):
        """Send parked viewers what was published up to `head`, at most `budget` of them; True if some wait still.

        The viewers written to are those due() in `ticks`: with None, those that are not paced.
        """
        now = self._clock()
        for key in [key for key in self._groups if key[0] != head and due(key[2], ticks)]:
            budget = self._write_group(key, head, now, budget)
            if budget <= 0:
                return True
        for viewer in [viewer for viewer in self._filtered if viewer.seq != head and due(viewer.every, ticks)]:
            self._write_filtered(viewer, head, now)
        return False

    def _write_group(self, key, head, now, budget):
        seq, chunked, every = key
        group = self._groups[key]  # left in place while sending: whatever happens, wake_all() finds them
        news = self._since(seq, None)
        if news is None:  # a whole ring behind: each takes a fresh snapshot itself
            del self._groups[key]
            for viewer in group:
                self._wake(viewer, seq)
            return budget
        data, moving = b"".join(news[0]), group
        if data and chunked:
            data = chunk(data)
        if data and len(group) > budget:  # a bounded part; the rest waits for the next call, where it is
            sending, budget, moving = list(islice(group, budget)), 0, {}
            short = dict(_send(sending, data, now))
            for viewer in sending:
                del group[viewer]
                if viewer in short:
                    self._wake_short(viewer, data, short[viewer], head)
                else:
                    moving[viewer] = None
        else:  # the usual case: all of it, and then the group moves as one
            if data:  # never send nothing: an empty chunk would end the response
                budget -= len(group)
                for viewer, sent in _send(group, data, now):
                    del group[viewer]
                    self._wake_short(viewer, data, sent, head)
            del self._groups[key]
        into = self._groups.get((head, chunked, every))
        if into is not None and len(into) >= len(moving):
            into.update(moving)
        elif moving:
            if into is not None:
                moving.update(into)
            self._groups[head, chunked, every] = moving
        return budget

    def _wake_short(self, viewer, data, sent, head):
        """Wake a viewer whose socket took only `sent` bytes of `data`: it sends the rest before anything else."""
        viewer.rest = data[sent:]
        self._wake(viewer, head)

    def _write_filtered(self, viewer, head, now):
        news = self._since(viewer.seq, viewer.devices)
        if news is None:
            self._filtered.discard(viewer)
            return self._wake(viewer, viewer.seq)
        if news[0]:
            data = b"".join(news[0])
            data = chunk(data) if viewer.chunked else data
            for _, sent in _send([viewer], data, now):  # it did not fit
                self._filtered.discard(viewer)
                return self._wake_short(viewer, data, sent, head)
        viewer.seq = head

    @staticmethod
    def _wake(viewer, seq):
        """Wake a viewer already taken out, to write for itself from `seq` on."""
        viewer.seq = seq
        viewer.woken.set()

    def wake_quiet(self, quiet_s):
        """Wake every viewer that nothing was written to for `quiet_s`: it is due a heartbeat."""
        now = self._clock()
        for key, group in list(self._groups.items()):
            for viewer in [viewer for viewer in group if now - viewer.last_write >= quiet_s]:
                del group[viewer]
                self._wake(viewer, key[0])
            if not group:
                del self._groups[key]
        for viewer in [viewer for viewer in self._filtered if now - viewer.last_write >= quiet_s]:
            self._filtered.discard(viewer)
            self._wake(viewer, viewer.seq)

    def wake_all(self):
        """Wake every viewer, to write for itself (after a reset)."""
        groups, self._groups = self._groups, {}
        for (seq, _, _), group in groups.items():
            for viewer in group:
                self._wake(viewer, seq)
        filtered, self._filtered = self._filtered, set()
        for viewer in filtered:
            self._wake(viewer, viewer.seq)

    def set_all(self):
        """Wake every viewer without the lock, as on shutdown; each sees the stream closed and leaves."""
        for group in list(self._groups.values()):  # list(): a copy made in one step, safe beside a pass
            for viewer in list(group):
                viewer.woken.set()
        for viewer in list(self._filtered):
            viewer.woken.set()

"""Fan events out to every subscriber through one condition variable and a bounded ring."""
import logging
import math
import re
import secrets
import threading
import time

from gpustats.stream import sse
from gpustats.stream.fanout import ParkedViewers, Viewer

log = logging.getLogger("gpustats")


class BroadcastCondition:
    """A condition variable whose notify_all costs the notifier O(1), whatever the waiters.

    threading.Condition.notify_all releases one lock per waiter inside the notifier's
    call, and under gevent each wait allocates a lock (what a wake-up costs each way:
    docs/PERFORMANCE.md). Waiters of one generation share one Event instead: notify_all
    swaps in a fresh Event and sets the old one. Works the same with OS threads and with
    gevent's monkey-patched threading.
    """

    def __init__(self):
        self._lock = threading.Lock()
        self._generation = threading.Event()

    def __enter__(self):
        self._lock.acquire()
        return self

    def __exit__(self, *exc):
        self._lock.release()

    def wait(self):
        """Release the lock, sleep until notified, take the lock again."""
        generation = self._generation
        self._lock.release()
        try:
            return generation.wait()
        finally:
            self._lock.acquire()

    def wait_on(self, event):
        """Release the lock, sleep until `event` is set, take the lock again."""
        self._lock.release()
        try:
            return event.wait()
        finally:
            self._lock.acquire()

    def wake_all(self):
        """Wake every current waiter without the lock (for shutdown; waiters recheck state)."""
        self._generation.set()

    def notify_all(self):
        """Wake every current waiter; the caller must hold the lock."""
        generation, self._generation = self._generation, threading.Event()
        generation.set()


HEARTBEAT = sse.comment("heartbeat")
FAN_OUT_BATCH = 1024  # sends between two chances for pushes to get in (docs/PERFORMANCE.md)
FAN_OUT_REST = 0.5  # after a pass of over 5 ms, rest this fraction of its time, so events gather
# The most a stream writes at once when it catches up (a resume, a snapshot, a viewer that fell
# behind): a viewer that never reads then pins this (and gunicorn's framed copy of it), not the
# whole replay, megabytes per stuck viewer when it was joined whole (docs/PERFORMANCE.md).
CATCH_UP_BYTES = 64 * 1024


class ViewerLimit(Exception):
    """A stream refused because a cap is reached; `status` is the HTTP answer to give."""

    def __init__(self, status, message):
        super().__init__(message)
        self.status = status


# ASCII digits only and not too many: '²'.isdigit() is true and int() of 5,000 digits raises.
STREAM_ID = re.compile(r"([0-9]{1,20})-([0-9]{1,20})", re.ASCII)
SEQUENCE = re.compile(r"[0-9]{1,20}", re.ASCII)


def stream_key(event_id):
    """Return a Redis stream id `<ms>-<n>` as a sortable (ms, n), or None if it is not one."""
    found = STREAM_ID.fullmatch(event_id or "")
    return (int(found[1]), int(found[2])) if found else None


def new_boot_id():
    """Return an id prefix unique to this server start, so resumed ids never match old events."""
    return f"{int(time.time()):x}{secrets.token_hex(3)}"


class Broadcaster:
    """Publish costs O(1) whatever the number of subscribers: no per-subscriber queues.

    Each event is framed once and stored in a ring of `ring_size` slots indexed by its
    sequence number. A subscriber remembers the last sequence it sent, waits on the
    condition, and writes everything newer in one chunk. One that fell more than a ring
    behind gets a fresh snapshot instead, so a stuck client never grows memory.

    Heartbeats: one ticker notifies the condition every heartbeat_s/4, and a woken
    subscriber that has sent nothing for heartbeat_s minus a tick writes a comment, so
    the gap between writes stays within [3/4, 1] x heartbeat_s. A timer per waiting
    subscriber would do the same at more CPU per delivered event (docs/PERFORMANCE.md).
    """

    def __init__(self, snapshot, ring_size=1024, heartbeat_s=15.0, boot_id=None, clock=time.monotonic,
                 max_subscribers=None, max_per_client=None, shared_ids=False):
        # callable() -> ((seq, event id), [(device, data)]): every device's state at that position
        self._snapshot = snapshot
        self._snapshot_lock = threading.Lock()
        self._snapshot_built = (None, [], [])  # (seq, [(device, frame)], all frames in pieces)
        self._max_subscribers = max_subscribers
        self._max_per_client = max_per_client
        self._per_client = {}  # client address -> open streams
        self._parked = ParkedViewers(self._since, clock)  # caught up: the fan-out writes to them
        self._due = threading.Event()  # set when there is news for parked viewers
        self._cond = BroadcastCondition()
        self._ring = [None] * ring_size
        # With shared_ids, events arrive with ids every host agrees on (a Redis stream's), kept
        # here as sortable keys so a Last-Event-ID from another host resumes at the right place.
        self._shared_ids = shared_ids
        self._keys = [None] * ring_size
        self._floor = 0  # a subscriber behind this sequence gets a fresh snapshot (after reset())
        self._newest_id = "0-0" if shared_ids else None
        self._size = ring_size
        self._seq = 0
        self._closed = False
        self._ended = threading.Event()  # set with _closed: what sleeps on it (the pacer, a paced stream) wakes
        self._clock = clock
        self._tick_s = heartbeat_s / 4
        self._quiet_s = heartbeat_s - self._tick_s
        self._ticker = None
        self._pacer = None  # started by the first viewer that asks for its events `every` so many seconds
        self.boot_id = boot_id or new_boot_id()
        self.subscribers = 0

    def event_id(self, seq):
        """Return the SSE id of sequence number `seq`."""
        return f"{self.boot_id}-{seq}"

    @staticmethod
    def encode(device, data, event=None, finite=False):
        """Do all the work of a publish that can fail (ValueError), touching no state; see sse.data_block."""
        return device, sse.event_head(event), sse.data_block(data, finite)

    def publish(self, device, data, event=None):
        """Frame `data` once, store it for every subscriber, wake them; return its id."""
        return self.publish_encoded(self.encode(device, data, event))

    def publish_encoded(self, encoded, event_id=None):
        """Publish what encode() returned, under `event_id` if the ids are shared; cannot fail."""
        device, head, block = encoded
        with self._cond:
            self._seq += 1
            slot = self._seq % self._size
            if self._shared_ids:
                self._keys[slot], self._newest_id = stream_key(event_id), event_id
            else:
                event_id = self.event_id(self._seq)
            self._ring[slot] = (device, b"id: %s\n%s%s" % (event_id.encode(), head, block))
            if self._parked.prompt():  # a page's stream paced once a second (?every=1) needs no pass a push
                self._due.set()
            self._cond.notify_all()
        return event_id

    def _fan_out(self):
        """Write what is new to the parked viewers, a pass at a time, until closed.

        One greenlet sends for every caught-up viewer: one non-blocking send each, and no
        wake-up, generator step or gunicorn writer per viewer. It lets pushes in after every
        FAN_OUT_BATCH sends, and what they publish reaches the rest of the pass at once.
        After a long pass it rests for half as long as the pass took, so under load events
        gather and each viewer gets fewer, larger writes: resting saves CPU per event, and
        resting half as long keeps most of that at a lower p99 (docs/PERFORMANCE.md).
        """
        while not self._closed:
            self._due.wait()
            self._due.clear()
            started = time.monotonic()
            self._write_parked(None)
            took = time.monotonic() - started
            if took > 0.005:  # under load: rest, so events gather into fewer, larger writes
                time.sleep(took * FAN_OUT_REST)

    def _pace(self):
        """At each whole second, write what is new to the parked viewers paced to it (see fanout.py), until closed.

        A pass covers the seconds since the last one: one that comes late (a busy hub) skips no viewer's second.
        """
        last = math.floor(time.time())
        while not self._closed:
            while (left := last + 1 - time.time()) > 0:
                if self._ended.wait(left):
                    return
            now = math.floor(time.time())
            self._write_parked((last, now))
            last = now

    def _write_parked(self, ticks):
        """One pass over the parked viewers due in `ticks` (fanout.due), FAN_OUT_BATCH sends at a time."""
        more = True
        while more:
            with self._cond:
                if self._closed:
                    return
                try:
                    more = self._parked.write(self._seq, FAN_OUT_BATCH, ticks)
                except Exception:  # never silently gone: say so, and let every viewer write for itself
                    log.exception("the fan-out failed; its viewers catch up by themselves")
                    self._parked.wake_all()
                    more = False
            if more:
                time.sleep(0)  # let pushes, new viewers and leaving ones in

    def reset(self):
        """Send every subscriber a fresh snapshot: events may have been lost upstream."""
        with self._cond:
            self._seq += 1
            slot = self._seq % self._size
            self._ring[slot], self._keys[slot] = (None, b""), self._keys[(self._seq - 1) % self._size]
            self._floor = self._seq
            self._parked.wake_all()
            self._cond.notify_all()

    def close(self):
        """End every stream, as on shutdown; takes no lock, so a signal handler may call it."""
        self._closed = True
        self._ended.set()
        self._cond.wake_all()  # a waiter that misses this sees the flag at the next tick
        self._due.set()
        self._parked.set_all()

    def _tick(self):
        while not self._closed:
            time.sleep(self._tick_s)
            with self._cond:
                self._cond.notify_all()
                self._parked.wake_quiet(self._quiet_s)  # due a heartbeat

    def _resume_seq(self, last_event_id):
        """Return the sequence to resume after, or None when a snapshot is needed."""
        if self._shared_ids:
            return self._shared_resume_seq(stream_key(last_event_id))
        boot, _, seq = (last_event_id or "").rpartition("-")
        if boot != self.boot_id or not SEQUENCE.fullmatch(seq):
            return None
        seq = int(seq)
        if seq > self._seq or self._seq - seq > self._size or seq < self._floor:
            return None
        return seq

    def _shared_resume_seq(self, key):
        """Find the last event at or before `key` in the ring; None if it is older or newer than it all."""
        if key is None:
            return None
        if self._seq == 0:
            return 0 if key == (0, 0) else None
        low, high = max(1, self._seq - self._size + 1, self._floor), self._seq
        if key < self._keys[low % self._size] or key > self._keys[high % self._size]:
            return None  # older: it may have missed what fell off; newer: this host has not read it yet
        while low < high:  # keys rise with the sequence: binary search
            middle = (low + high + 1) // 2
            if self._keys[middle % self._size] <= key:
                low = middle
            else:
                high = middle - 1
        # At or before a reset: what was lost upstream lies after this id, so a fresh snapshot.
        return None if self._floor and low <= self._floor else low

    def position(self):
        """Return (sequence, event id) of the newest event; a snapshot taken now describes this point."""
        with self._cond:
            return self._seq, self._newest_id if self._shared_ids else self.event_id(self._seq)

    def _snapshot_chunk(self, devices):
        """Return (every device's latest state as pieces of at most CATCH_UP_BYTES, the sequence it matches).

        Built once per sequence number, whatever the number of viewers that connect at it, and
        never under the broadcaster's lock: 1,000 pages reconnecting after a deploy share one build.
        """
        with self._snapshot_lock:
            if self._snapshot_built[0] != self._seq:
                (seq, event_id), states = self._snapshot()
                # Snapshot events share the id of the stream position they describe: resuming
                # from any of them replays exactly the events published after the snapshot.
                frames = []
                for device, data in states:
                    try:
                        frames.append((device, sse.frame(data, event_id)))
                    except ValueError:  # pushes are checked before they are stored; this is the last guard
                        log.exception("left %s out of a snapshot: its state cannot be sent", device)
                self._snapshot_built = (seq, frames, list(pieces(frame for _, frame in frames)))
            seq, frames, joined = self._snapshot_built
        if devices is None:
            return joined, seq
        return pieces(frame for device, frame in frames if device in devices), seq

    def _since(self, seq, devices, most=None):
        """Return (frames after `seq`, new seq), or None if `seq` fell off the ring: a snapshot is needed.

        With `most`, stop after the frame that reaches `most` bytes: the new seq is that frame's.
        """
        if self._seq - seq > self._size or seq < self._floor:
            return None
        ring, size = self._ring, self._size
        if most is None:  # the fan-out's path: a pass's news, a few events
            if devices is None:
                return [ring[s % size][1] for s in range(seq + 1, self._seq + 1)], self._seq
            return [frame for device, frame in (ring[s % size] for s in range(seq + 1, self._seq + 1))
                    if device in devices], self._seq
        frames, taken = [], 0
        while seq < self._seq and taken < most:
            seq += 1
            device, frame = ring[seq % size]
            if devices is None or device in devices:
                frames.append(frame)
                taken += len(frame)
        return frames, seq

    def subscribe(self, devices=None, last_event_id=None, retry_ms=3000, client=None, viewer_socket=None,
                  every=None):
        """Admit one subscriber and return its stream: an iterator of byte chunks.

        Raises ViewerLimit when a cap is reached. Admission and counting are one step under
        the lock, and the count is given back exactly once however the stream ends: read to
        the end, closed before its first chunk (a HEAD request, a client gone at once), or
        failed. The generator is started here, inside its try, so close() always reaches
        its `finally` (an unstarted generator's close() would skip it).

        With `viewer_socket` (viewer_socket.py), events that find the viewer caught up are
        written to its socket by the fan-out (fanout.py); the stream writes the rest.

        With `every` (whole seconds), what is published meanwhile is written at the whole seconds
        it divides, in one write, rather than as it comes: the same events, fewer writes to read.
        """
        stream = self._stream(devices, last_event_id, retry_ms, client, viewer_socket, every)
        next(stream)  # raises ViewerLimit, or returns once admitted
        return stream

    def _admit(self, client):
        if self._max_subscribers is not None and self.subscribers >= self._max_subscribers:
            raise ViewerLimit(503, "too many viewers are connected; try again shortly")
        open_here = self._per_client.get(client, 0)
        if self._max_per_client is not None and open_here >= self._max_per_client:
            raise ViewerLimit(429, f"this address already has {open_here} streams open")
        self.subscribers += 1
        self._per_client[client] = open_here + 1

    def _release(self, client):
        self.subscribers -= 1
        left = self._per_client[client] - 1
        if left:
            self._per_client[client] = left
        else:
            del self._per_client[client]

    def _stream(self, devices, last_event_id, retry_ms, client, viewer_socket, every):
        with self._cond:
            self._admit(client)
        viewer = None
        try:
            yield None  # admitted: subscribe() returns the stream from here
            with self._cond:
                if self._ticker is None:
                    # Started by the first subscriber, so it runs in the serving process.
                    self._ticker = threading.Thread(target=self._tick, name="heartbeat", daemon=True)
                    self._ticker.start()
                    threading.Thread(target=self._fan_out, name="fan-out", daemon=True).start()
                if every and self._pacer is None:
                    self._pacer = threading.Thread(target=self._pace, name="pacer", daemon=True)
                    self._pacer.start()
                seq = self._resume_seq(last_event_id)
                # What it missed, CATCH_UP_BYTES at a time: the rest comes in the loop below.
                missed = None if seq is None else self._since(seq, devices, CATCH_UP_BYTES)
            if missed is None:
                chunks, seq = self._snapshot_chunk(devices)
            else:
                chunks, seq = [b"".join(missed[0])], missed[1]
            yield from _after(sse.retry(retry_ms), chunks)  # through gunicorn: it sends the headers first
            last_write = self._clock()
            viewer = Viewer(viewer_socket, devices, every) if viewer_socket is not None else None
            while True:
                rest, waited = b"", False
                with self._cond:
                    if seq == self._seq and not self._closed:
                        waited = True
                        if viewer is None:
                            self._cond.wait()
                        else:
                            self._parked.park(viewer, seq, last_write)
                            self._cond.wait_on(viewer.woken)
                            self._parked.leave(viewer)  # close() wakes without taking it out
                            seq, last_write, rest, viewer.rest = viewer.seq, viewer.last_write, viewer.rest, b""
                    if self._closed:
                        return
                    # Paced, woken by news, and nothing writes for it: it waits for its second, or until a
                    # heartbeat would be due, whichever comes first; then it writes all it has (not only
                    # CATCH_UP_BYTES a second: a fleet publishing more would leave it ever further behind).
                    gather = every and viewer is None and waited and seq != self._seq
                    if not gather:
                        news = self._since(seq, devices, CATCH_UP_BYTES) if seq != self._seq else ((), seq)
                if gather:
                    wait = min(every - time.time() % every, self._quiet_s - (self._clock() - last_write))
                    if wait > 0 and self._ended.wait(wait):
                        return
                    with self._cond:
                        if self._closed:
                            return
                        news = self._since(seq, devices, CATCH_UP_BYTES)
                if rest:  # the end of an event the publisher began to send: before anything else
                    viewer_socket.send_all(rest)
                    last_write = self._clock()
                if news is None:  # fell a whole ring behind: the latest state replaces what it missed
                    chunks, seq = self._snapshot_chunk(devices)
                    for chunk in chunks:
                        yield chunk
                    last_write = self._clock()
                    continue
                frames, seq = news
                now = self._clock()
                if frames:
                    yield frames[0] if len(frames) == 1 else b"".join(frames)
                elif now - last_write >= self._quiet_s:
                    yield HEARTBEAT
                else:
                    continue
                last_write = now
        finally:
            with self._cond:
                self._release(client)
                if viewer is not None:
                    self._parked.leave(viewer)


def pieces(frames, most=CATCH_UP_BYTES):
    """Yield `frames` joined into pieces of about `most` bytes (a larger frame is a piece of its own)."""
    piece, size = [], 0
    for frame in frames:
        piece.append(frame)
        size += len(frame)
        if size >= most:
            yield b"".join(piece)
            piece, size = [], 0
    if piece:
        yield b"".join(piece)


def _after(first, chunks):
    """Yield `first` joined to the first of `chunks`, then the rest: one write where one will do."""
    chunks = iter(chunks)
    yield first + next(chunks, b"")
    yield from chunks

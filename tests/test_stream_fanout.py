"""The direct path: caught-up viewers written to by the fan-out, over real sockets.

Each viewer is one end of a socketpair. A thread plays gunicorn: it writes what the stream
yields, framed as a chunk, with a blocking sendall. What the other end reads must be one
valid chunked body with every event in order, whoever wrote each part.
"""
import socket
import threading
import time

import pytest

from conftest import dechunk
from gpustats.stream.broadcaster import Broadcaster
from gpustats.stream.fanout import ParkedViewers, Viewer, chunk, due
from gpustats.stream.viewer_socket import ViewerSocket, viewer_socket


def make(state=None, ring_size=64, heartbeat_s=30):
    state = {} if state is None else state
    b = Broadcaster(lambda: (b.position(), sorted(state.items())), ring_size=ring_size, heartbeat_s=heartbeat_s)
    return b, state


class DirectViewer:
    """A stream with a socket: its first chunk and anything it yields go out as gunicorn would write them."""

    def __init__(self, b, chunked=True, devices=None, buffer_bytes=None, last_event_id=None, try_send=None,
                 every=None):
        self.ours, self.theirs = socket.socketpair()
        if buffer_bytes:
            self.ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, buffer_bytes)
            self.theirs.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, buffer_bytes)
        self.chunked, self.yields, self.rests, self.received = chunked, 0, 0, b""
        direct = ViewerSocket(self.ours, chunked)
        direct.send_all = self._send_rest
        direct.try_send = try_send or direct.try_send
        self.stream = b.subscribe(devices=devices, last_event_id=last_event_id, viewer_socket=direct, every=every)
        self.writer = threading.Thread(target=self._write, daemon=True)
        self.writer.start()

    def _send_rest(self, data):
        self.rests += 1
        self.ours.sendall(data)

    def _write(self):
        for data in self.stream:
            self.yields += 1
            self.ours.sendall(chunk(data) if self.chunked else data)

    def read(self, until, timeout=5):
        """Read until `until(bodies)` holds; return the bodies (chunk payloads, or raw bytes if not chunked)."""
        self.theirs.settimeout(0.05)
        deadline = time.monotonic() + timeout
        while True:
            bodies = dechunk(self.received) if self.chunked else [self.received]
            if until(bodies):
                return bodies
            assert time.monotonic() < deadline, f"never got there; read {self.received[-300:]!r}"
            try:
                self.received += self.theirs.recv(1 << 16)
            except TimeoutError:
                pass


def data_of(bodies):
    return [line[6:] for line in b"".join(bodies).decode().split("\n") if line.startswith("data: ")]


def parked(b, count):
    """Wait until `count` viewers are parked, caught up."""
    deadline = time.monotonic() + 5
    while sum(len(g) for g in b._parked._groups.values()) + len(b._parked._filtered) < count:
        assert time.monotonic() < deadline, "viewers never parked"
        time.sleep(0.005)


def test_caught_up_viewers_get_each_event_from_the_fan_out_framed_as_gunicorn_would():
    b, _ = make()
    viewers = [DirectViewer(b) for _ in range(3)]
    parked(b, 3)
    for n in range(5):
        b.publish("a", {"n": n})
    for viewer in viewers:
        bodies = viewer.read(lambda got: len(data_of(got)) == 5)
        assert data_of(bodies) == [f'{{"n":{n}}}' for n in range(5)]
        assert viewer.yields == 1, "events went through the stream, not straight to the socket"
    b.close()


def test_a_viewer_whose_socket_fills_writes_the_rest_itself_and_loses_nothing():
    b, _ = make(ring_size=4096)
    slow, fast = DirectViewer(b, buffer_bytes=4096), DirectViewer(b)
    parked(b, 2)
    block = "x" * 3000
    for n in range(200):  # far more than the slow viewer's buffers hold: sends go short
        b.publish("a", {"n": n, "pad": block})
    assert len(data_of(fast.read(lambda got: len(data_of(got)) == 200))) == 200
    got = data_of(slow.read(lambda got: len(data_of(got)) == 200, timeout=10))
    assert [int(line.split(",")[0][5:]) for line in got] == list(range(200))
    assert slow.rests > 0, "the slow viewer never had to finish a send itself"
    b.close()


def test_an_http_1_0_viewer_gets_bare_frames_from_the_fan_out():
    b, _ = make()
    viewer = DirectViewer(b, chunked=False)
    parked(b, 1)
    b.publish("a", {"n": 1})
    raw = viewer.read(lambda got: b'"n":1' in got[0])[0]
    assert raw.startswith(b"retry: 3000\n\n") and b"\r\n" not in raw
    b.close()


def test_a_filtered_viewer_is_sent_only_its_devices():
    b, _ = make()
    viewer = DirectViewer(b, devices={"b"})
    parked(b, 1)
    for device in "abab":
        b.publish(device, {"from": device})
    assert data_of(viewer.read(lambda got: len(data_of(got)) == 2)) == ['{"from":"b"}'] * 2
    assert viewer.yields == 1
    b.close()


def test_a_viewer_a_whole_ring_behind_takes_a_snapshot_of_the_latest():
    state = {}
    b, _ = make(state, ring_size=8)
    viewer = DirectViewer(b, buffer_bytes=4096)
    parked(b, 1)
    for n in range(300):  # its buffers fill, and the ring turns many times while it is stuck
        state["a"] = {"n": n, "pad": "x" * 2000}
        b.publish("a", state["a"])
    got = data_of(viewer.read(lambda got: any(b'"n":299' in body for body in got), timeout=10))
    numbers = [int(line.split(",")[0][5:]) for line in got]
    assert numbers == sorted(numbers) and len(numbers) < 300, "a backlog was replayed instead of a snapshot"
    b.close()


def test_a_parked_viewer_gets_heartbeats_while_nothing_is_published():
    b, _ = make(heartbeat_s=0.2)
    viewer = DirectViewer(b)
    viewer.read(lambda got: sum(body.startswith(b": heartbeat") for body in got) >= 2, timeout=3)
    b.close()


def just_past_a_second():
    """Sleep until 50 ms past the next whole second: what is published in the next 0.9 s falls in one second."""
    time.sleep(1.05 - time.time() % 1)


def test_a_paced_viewer_gets_what_came_in_a_second_in_one_write_the_same_bytes_as_the_others():
    b, _ = make()
    paced, prompt = DirectViewer(b, every=1), DirectViewer(b)
    parked(b, 2)
    just_past_a_second()
    for n in range(6):  # 0.1 s apart, as a fleet's pushes come
        b.publish("a", {"n": n})
        time.sleep(0.1)
    events = [f'{{"n":{n}}}' for n in range(6)]
    prompt_bodies = prompt.read(lambda got: len(data_of(got)) == 6)
    paced_bodies = paced.read(lambda got: len(data_of(got)) == 6, timeout=3)
    assert data_of(paced_bodies) == data_of(prompt_bodies) == events
    assert b"".join(paced_bodies[1:]) == b"".join(prompt_bodies[1:])  # ids included
    # Every chunk is one write: after the first (retry and snapshot), one a second here, one an event there.
    assert len(paced_bodies) - 1 <= 2 < len(prompt_bodies) - 1, (paced_bodies, prompt_bodies)
    b.close()


def test_a_paced_filtered_viewer_gets_only_its_devices_gathered():
    b, _ = make()
    viewer = DirectViewer(b, devices={"b"}, every=1)
    parked(b, 1)
    just_past_a_second()
    for device in "abababab":
        b.publish(device, {"from": device})
        time.sleep(0.05)
    bodies = viewer.read(lambda got: len(data_of(got)) == 4, timeout=3)
    assert data_of(bodies) == ['{"from":"b"}'] * 4 and len(bodies) - 1 <= 2, bodies
    b.close()


def test_a_paced_viewer_gets_heartbeats_and_is_ended_by_close():
    b, _ = make(heartbeat_s=0.2)
    viewer = DirectViewer(b, every=1)
    viewer.read(lambda got: sum(body.startswith(b": heartbeat") for body in got) >= 2, timeout=3)
    b.close()
    viewer.writer.join(2)
    assert not viewer.writer.is_alive() and b.subscribers == 0


def test_a_pacer_pass_writes_to_the_viewers_whose_every_divides_a_second_it_covers():
    assert due(None, None) and not due(1, None)  # the fan-out's passes: those not paced
    assert due(1, (10, 11)) and not due(None, (10, 11))
    assert due(2, (11, 12)) and not due(2, (10, 11))  # every other second
    assert due(5, (13, 16)) and not due(5, (10, 14))  # a late pass, over 14-16, still covers 15


def test_a_paced_viewer_without_a_socket_gathers_by_waiting_for_its_second():
    b, _ = make()
    stream, writes = b.subscribe(every=1), []  # a stream only gunicorn writes (TLS, say)

    def write():
        for data in stream:
            writes.append(data)
    writer = threading.Thread(target=write, daemon=True)
    writer.start()
    deadline = time.monotonic() + 5
    while not writes:  # the retry and the snapshot
        assert time.monotonic() < deadline
        time.sleep(0.01)
    just_past_a_second()
    for n in range(6):
        b.publish("a", {"n": n})
        time.sleep(0.1)
    while len(data_of(writes)) < 6:
        assert time.monotonic() < deadline + 3, writes
        time.sleep(0.01)
    assert data_of(writes) == [f'{{"n":{n}}}' for n in range(6)] and len(writes) - 1 <= 2, writes
    b.close()
    writer.join(2)
    assert not writer.is_alive()


def test_a_paced_viewer_without_a_socket_writes_all_it_has_at_its_second_not_a_piece():
    b, _ = make(ring_size=256)
    stream, writes = b.subscribe(every=1), []

    def write():
        for data in stream:
            writes.append((time.time(), data))
    threading.Thread(target=write, daemon=True).start()
    deadline = time.monotonic() + 5
    while not writes:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    just_past_a_second()
    for n in range(100):  # 200 KB at once: over three CATCH_UP_BYTES pieces
        b.publish("a", {"n": n, "pad": "x" * 2000})
    while len(data_of([data for _, data in writes])) < 100:
        assert time.monotonic() < deadline + 5, len(writes)
        time.sleep(0.01)
    seconds = {int(at) for at, _ in writes[1:]}
    assert len(seconds) <= 2, f"written over {len(seconds)} seconds: a piece a second"
    b.close()


def test_reset_sends_parked_viewers_a_fresh_snapshot_and_close_ends_them():
    state = {"a": {"v": 1}}
    b, _ = make(state)
    viewer = DirectViewer(b)
    parked(b, 1)
    state["a"] = {"v": 2}
    b.reset()
    assert data_of(viewer.read(lambda got: len(data_of(got)) == 2)) == ['{"v":1}', '{"v":2}']
    b.close()
    viewer.writer.join(2)
    assert not viewer.writer.is_alive()
    assert b.subscribers == 0


def test_resuming_viewers_are_sent_only_what_they_missed():
    b, _ = make()
    first = b.publish("a", {"n": 0})
    b.publish("a", {"n": 1})
    viewer = DirectViewer(b, last_event_id=first)
    parked(b, 1)
    b.publish("a", {"n": 2})
    assert data_of(viewer.read(lambda got: len(data_of(got)) == 2)) == ['{"n":1}', '{"n":2}']
    b.close()


def test_if_the_fan_out_fails_it_says_so_and_its_viewers_get_the_events_themselves(caplog):
    def broken(data):
        raise RuntimeError("a bug in the pass")
    b, _ = make()
    viewer = DirectViewer(b, try_send=broken)
    parked(b, 1)
    b.publish("a", {"n": 1})
    assert data_of(viewer.read(lambda got: len(data_of(got)) == 1)) == ['{"n":1}']
    assert viewer.yields == 2
    assert "the fan-out failed" in caplog.text
    b.publish("a", {"n": 2})  # and it goes on
    assert data_of(viewer.read(lambda got: len(data_of(got)) == 2))[-1] == '{"n":2}'
    b.close()


class Ring:
    """Frames by sequence number, as the broadcaster's _since() hands them out."""

    def __init__(self):
        self.frames = []

    def since(self, seq, devices):
        return [frame for device, frame in self.frames[seq:] if devices is None or device in devices], len(self.frames)


def pair():
    """A viewer on a socket that keeps each send apart, so a test sees how many there were."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    theirs.settimeout(1)
    return Viewer(ViewerSocket(ours, chunked=False), None), theirs


def test_a_pass_sends_to_a_bounded_number_of_viewers_and_the_rest_get_what_came_meanwhile():
    ring, clock = Ring(), lambda: 0.0
    viewers = ParkedViewers(ring.since, clock)
    pairs = [pair() for _ in range(3)]
    for viewer, _ in pairs:
        viewers.park(viewer, 0, 0.0)
    ring.frames.append(("a", b"one\n\n"))
    assert viewers.write(1, budget=2) is True
    ring.frames.append(("a", b"two\n\n"))  # published while the fan-out let pushes in
    while viewers.write(2, budget=2):
        pass
    assert pairs[2][1].recv(100) == b"one\n\ntwo\n\n"  # in one send
    for viewer, theirs in pairs[:2]:
        assert theirs.recv(100) == b"one\n\n" and theirs.recv(100) == b"two\n\n"


def test_a_viewer_that_leaves_between_two_batches_is_not_sent_to():
    ring = Ring()
    viewers = ParkedViewers(ring.since, lambda: 0.0)
    (first, first_end), (second, second_end) = pair(), pair()
    viewers.park(first, 0, 0.0)
    viewers.park(second, 0, 0.0)
    ring.frames.append(("a", b"one\n\n"))
    assert viewers.write(1, budget=1) is True
    viewers.leave(second)
    assert viewers.write(1, budget=1) is False
    assert first_end.recv(100) == b"one\n\n"
    second_end.settimeout(0.05)
    with pytest.raises(TimeoutError):
        second_end.recv(100)


@pytest.mark.parametrize("environ, direct", [
    ({"REQUEST_METHOD": "GET", "SERVER_PROTOCOL": "HTTP/1.1"}, "no socket: the test client"),
    ({"REQUEST_METHOD": "HEAD", "SERVER_PROTOCOL": "HTTP/1.1", "gunicorn.socket": "sock"}, "HEAD has no body"),
    ({"REQUEST_METHOD": "GET", "SERVER_PROTOCOL": "HTTP/1.1", "gunicorn.socket": "tls"}, "TLS records"),
])
def test_only_plain_sockets_of_gets_are_written_to_directly(environ, direct):
    class Tls:
        def cipher(self):
            return "TLS_AES_128_GCM_SHA256"
    if environ.get("gunicorn.socket") == "tls":
        environ["gunicorn.socket"] = Tls()
    assert viewer_socket(environ) is None, direct


def test_the_framing_follows_the_protocol_as_gunicorn_does():
    ours, _ = socket.socketpair()
    get = {"REQUEST_METHOD": "GET", "gunicorn.socket": ours}
    assert viewer_socket({**get, "SERVER_PROTOCOL": "HTTP/1.1"}).chunked is True
    assert viewer_socket({**get, "SERVER_PROTOCOL": "HTTP/1.0"}).chunked is False

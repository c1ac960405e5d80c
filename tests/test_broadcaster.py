"""The broadcaster on its own, driven by real threads."""
import threading
import time

from broadcaster import Broadcaster


def events(chunk):
    """Return the data lines of a chunk of SSE bytes."""
    return [line[6:] for line in chunk.decode().split("\n") if line.startswith("data: ")]


def ids(chunk):
    return [line[4:] for line in chunk.decode().split("\n") if line.startswith("id: ")]


def make(state=None, ring_size=8, heartbeat_s=5):
    state = {} if state is None else state
    return Broadcaster(lambda devices: [(d, v) for d, v in sorted(state.items())
                                        if devices is None or d in devices],
                       ring_size=ring_size, heartbeat_s=heartbeat_s), state


def test_first_chunk_is_retry_then_snapshot_of_every_device():
    b, state = make({"a": {"device": "a"}, "b": {"device": "b"}})
    first = next(b.subscribe())
    assert first.startswith(b"retry: 3000\n\n")
    assert events(first) == ['{"device":"a"}', '{"device":"b"}']
    assert ids(first) == [f"{b.boot_id}-0"] * 2


def test_a_waiting_subscriber_gets_everything_published_in_one_chunk():
    b, _ = make()
    stream = b.subscribe()
    next(stream)
    got = []
    reader = threading.Thread(target=lambda: got.append(next(stream)))
    reader.start()
    time.sleep(0.05)
    for i in range(3):
        b.publish("a", {"n": i})
    reader.join(2)
    assert got and events(got[0])[0] == '{"n":0}'
    rest = [] if len(events(got[0])) == 3 else events(next(stream))
    assert len(events(got[0]) + rest) == 3


def test_publish_with_no_subscribers_is_bounded_by_the_ring():
    b, _ = make(ring_size=4)
    for i in range(1000):
        b.publish("a", {"n": i})
    assert len(b._ring) == 4


def test_resume_replays_only_what_was_missed():
    b, _ = make()
    first_id = b.publish("a", {"n": 1})
    b.publish("a", {"n": 2})
    b.publish("a", {"n": 3})
    chunk = next(b.subscribe(last_event_id=first_id))
    assert events(chunk) == ['{"n":2}', '{"n":3}']


def test_resume_from_another_boot_or_too_far_back_gets_a_snapshot():
    b, state = make({"a": {"snap": True}}, ring_size=4)
    old = b.publish("a", {"n": 0})
    for i in range(10):
        b.publish("a", {"n": i})
    assert events(next(b.subscribe(last_event_id=old))) == ['{"snap":true}']
    other = Broadcaster(lambda d: [], ring_size=4).event_id(5)
    assert events(next(b.subscribe(last_event_id=other))) == ['{"snap":true}']
    assert events(next(b.subscribe(last_event_id="garbage"))) == ['{"snap":true}']


def test_a_subscriber_that_falls_a_ring_behind_gets_a_snapshot_not_a_backlog():
    b, state = make({"a": {"latest": 1}}, ring_size=4)
    stream = b.subscribe()
    next(stream)
    for i in range(50):
        b.publish("a", {"n": i})
    assert events(next(stream)) == ['{"latest":1}']


def test_device_filter_applies_to_snapshot_and_events():
    b, state = make({"a": {"d": "a"}, "b": {"d": "b"}})
    stream = b.subscribe(devices={"b"})
    assert events(next(stream)) == ['{"d":"b"}']
    b.publish("a", {"n": "a"})
    b.publish("b", {"n": "b"})
    assert events(next(stream)) == ['{"n":"b"}']


def test_heartbeat_comes_within_heartbeat_s_when_nothing_is_published():
    b, _ = make(heartbeat_s=0.2)
    stream = b.subscribe()
    next(stream)
    gaps, last = [], time.monotonic()
    for _ in range(5):
        assert next(stream) == b": heartbeat\n\n"
        gaps.append(time.monotonic() - last)
        last = time.monotonic()
    assert all(0.14 <= gap <= 0.26 for gap in gaps), gaps


def test_no_heartbeat_while_events_keep_the_stream_busy():
    b, _ = make(heartbeat_s=0.2)
    stream = b.subscribe()
    next(stream)
    for i in range(8):
        time.sleep(0.05)
        b.publish("a", {"n": i})
        assert events(next(stream)) == [f'{{"n":{i}}}']


def test_subscriber_count_follows_open_streams_and_close_ends_them():
    b, _ = make()
    streams = [b.subscribe() for _ in range(3)]
    for s in streams:
        next(s)
    assert b.subscribers == 3
    streams[0].close()
    assert b.subscribers == 2
    b.close()
    assert list(streams[1]) == []
    assert b.subscribers == 1


def test_ids_are_unique_across_restarts():
    assert Broadcaster(lambda d: []).event_id(1) != Broadcaster(lambda d: []).event_id(1)


def test_many_threads_publishing_lose_nothing():
    b, _ = make(ring_size=4096)
    stream = b.subscribe()
    next(stream)
    workers = [threading.Thread(target=lambda: [b.publish("a", {}) for _ in range(500)]) for _ in range(4)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    seen = []
    while len(seen) < 2000:
        seen += ids(next(stream))
    assert len(set(seen)) == 2000

"""SSE framing as EventSource reads it."""
import pytest

from gpustats.stream import sse


def test_unnamed_event_has_id_and_data_only():
    assert sse.frame({"a": 1}, "b-7") == b'id: b-7\ndata: {"a":1}\n\n'


def test_named_event_carries_event_line():
    assert sse.frame({"s": "stale"}, "b-8", "status") == b'id: b-8\nevent: status\ndata: {"s":"stale"}\n\n'


def test_newlines_in_data_become_separate_data_lines():
    # A bare newline would end the data field early and corrupt the event.
    assert sse.frame("line1\nline2") == b"data: line1\ndata: line2\n\n"


def test_strings_with_newlines_stay_one_json_line():
    assert sse.frame({"name": "a\nb"}).count(b"\n") == 2


def test_nan_is_never_framed():
    with pytest.raises(ValueError):
        sse.frame({"t": float("nan")})


def test_line_break_in_id_is_refused():
    with pytest.raises(ValueError):
        sse.frame({}, "1\ndata: injected")


def test_comment_and_retry():
    assert sse.comment("heartbeat") == b": heartbeat\n\n"
    assert sse.retry(3000) == b"retry: 3000\n\n"


def test_non_ascii_is_sent_as_utf8():
    assert "°C".encode() in sse.frame({"unit": "°C"})

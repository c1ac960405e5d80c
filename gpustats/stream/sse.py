"""Server-Sent Events framing: pure functions from values to wire bytes."""
import json

import orjson


def encode_json(data):
    """Serialize `data` compactly; NaN and Infinity are refused, never sent."""
    return json.dumps(data, separators=(",", ":"), allow_nan=False, ensure_ascii=False)


def frame(data, event_id=None, event=None):
    """Return one SSE event as bytes: optional `id:` and `event:` lines, then `data:`."""
    head = b"" if event_id is None else f"id: {_one_line(event_id)}\n".encode()
    return head + event_head(event) + data_block(data)


def data_block(data, finite=False):
    """Return the `data:` lines of an event and its blank line, as bytes.

    Raises ValueError (UnicodeEncodeError is one) for what cannot be sent: NaN, Infinity,
    or a string holding a lone UTF-16 surrogate, which JSON can carry but UTF-8 cannot.
    `finite`: the caller has checked every number (a validated push), so orjson, faster than
    json (docs/PERFORMANCE.md) but writing NaN as null, may encode it. Compact JSON has no
    newline: one line.
    """
    if finite and not isinstance(data, str):
        try:
            return b"data: " + orjson.dumps(data) + b"\n\n"
        except orjson.JSONEncodeError as error:  # a lone surrogate; a number past 64 bits
            raise ValueError(str(error)) from None
    text = data if isinstance(data, str) else encode_json(data)
    # A newline in data would end the field early; each line gets its own `data:` prefix.
    return ("".join(f"data: {line}\n" for line in text.split("\n")) + "\n").encode()


def event_head(event=None):
    """Return the `event:` line of a named event, or nothing for an unnamed one."""
    return b"" if event is None else f"event: {_one_line(event)}\n".encode()


def comment(text=""):
    """Return a comment line, which EventSource ignores but proxies see as traffic."""
    return f": {_one_line(text)}\n\n".encode()


def retry(ms):
    """Return the `retry:` field that sets the browser's reconnect delay."""
    return f"retry: {int(ms)}\n\n".encode()


def _one_line(text):
    text = str(text)
    if "\n" in text or "\r" in text:
        raise ValueError("SSE field values cannot contain line breaks")
    return text

"""Server-Sent Events framing: pure functions from values to wire bytes."""
import json


def encode_json(data):
    """Serialize `data` compactly; NaN and Infinity are refused, never sent."""
    return json.dumps(data, separators=(",", ":"), allow_nan=False, ensure_ascii=False)


def frame(data, event_id=None, event=None):
    """Return one SSE event as bytes: optional `id:` and `event:` lines, then `data:`."""
    lines = []
    if event_id is not None:
        lines.append(f"id: {_one_line(event_id)}")
    if event is not None:
        lines.append(f"event: {_one_line(event)}")
    text = data if isinstance(data, str) else encode_json(data)
    # A newline in data would end the field early; each line gets its own `data:` prefix.
    lines.extend(f"data: {line}" for line in text.split("\n"))
    return ("\n".join(lines) + "\n\n").encode()


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

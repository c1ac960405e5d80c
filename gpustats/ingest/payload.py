"""Check a push body and return only the validated, known fields."""
import json
import math
import re

MAX_STRING = 128
MAX_GPUS = 64
MAX_PROCESSES = 64
MAX_DEPTH = 6  # body -> gpus -> gpu -> processes -> process -> value: deeper is not a push
MAX_MIB = 1 << 24  # 16 TiB in MiB: far above any GPU, far below nonsense.
# C0 and C1 controls, DEL, and the invisible characters that reorder or break lines in a
# browser (bidi overrides and isolates, U+2028/2029): a GPU name should not rearrange a tile.
CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")
# JSON's \uD800 escapes can make a lone or swapped UTF-16 surrogate, which no UTF-8 holds.
SURROGATE = re.compile("[\ud800-\udfff]")


class PushError(ValueError):
    """A push the server refuses; `field` names the offending part of the body."""

    def __init__(self, field, message):
        super().__init__(f"{field}: {message}" if field else message)
        self.field = field


def _number(low, high):
    def check(value, where):
        # bool is an int in Python, but `true` is no temperature.
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise PushError(where, f"must be a number or null, not {type(value).__name__}")
        # math.isfinite of an int past float range raises OverflowError: ints are finite anyway.
        if isinstance(value, float) and not math.isfinite(value):
            raise PushError(where, "must be finite")
        if not low <= value <= high:
            raise PushError(where, f"{_short(value)} is out of range {low} to {high}")
        return value
    check.bounds = (low, high)
    return check


def _integer(low, high):
    number = _number(low, high)

    def check(value, where):
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if not isinstance(value, int):
            raise PushError(where, "must be a whole number")
        return number(value, where)
    check.bounds = number.bounds
    return check


def _short(value):
    """Return a number as text for a message: a 4,000-digit integer is no message."""
    text = repr(value) if not isinstance(value, int) or abs(value) < 10**30 else f"a {len(str(abs(value)))}-digit number"
    return text if len(text) <= 40 else text[:37] + "..."


def _string(value, where):
    if not isinstance(value, str):
        raise PushError(where, f"must be a string or null, not {type(value).__name__}")
    if len(value) > MAX_STRING:
        raise PushError(where, f"is {len(value)} characters long, at most {MAX_STRING} are accepted")
    if SURROGATE.search(value):
        raise PushError(where, "is not valid Unicode: it holds a lone UTF-16 surrogate (\\ud800-\\udfff)")
    if CONTROL.search(value):
        raise PushError(where, "contains control characters")
    return value


def _boolean(value, where):
    if not isinstance(value, bool):
        raise PushError(where, "must be true or false")
    return value


PERCENT, MIB, CELSIUS = _number(0, 100), _number(0, MAX_MIB), _number(-100, 250)
WATTS, MHZ = _number(0, 100_000), _number(0, 100_000)

PROCESS_FIELDS = {"pid": _integer(0, 2**32), "name": _string, "user": _string, "memoryUsed": MIB}
GPU_FIELDS = {
    "index": _integer(0, 1023), "uuid": _string, "name": _string, "vendor": _string,
    "driverVersion": _string, "pstate": _string, "error": _string,
    "utilizationGpu": PERCENT, "utilizationMemory": PERCENT,
    "memoryTotal": MIB, "memoryUsed": MIB, "memoryFree": MIB,
    "temperatureGpu": CELSIUS, "temperatureMemory": CELSIUS,
    "powerDraw": WATTS, "powerLimit": WATTS, "fanSpeed": PERCENT,
    "clockCore": MHZ, "clockMemory": MHZ, "memoryShared": _boolean,
}
AGENT_FIELDS = {"version": _string, "backend": _string, "simulated": _boolean}


def _object(value, fields, where):
    if not isinstance(value, dict):
        raise PushError(where, "must be a JSON object")
    # Unknown fields are dropped; known ones are checked; null stays null.
    return {name: None if value[name] is None else check(value[name], f"{where}.{name}".lstrip("."))
            for name, check in fields.items() if name in value}


def _gpu(value, position):
    where = f"gpus[{position}]"
    gpu = _object(value, GPU_FIELDS, where)
    processes = value.get("processes")
    if processes is not None:
        if not isinstance(processes, list):
            raise PushError(f"{where}.processes", "must be a list")
        if len(processes) > MAX_PROCESSES:
            raise PushError(f"{where}.processes", f"has {len(processes)} entries, at most {MAX_PROCESSES} are accepted")
        gpu["processes"] = [_process(p, f"{where}.processes[{i}]") for i, p in enumerate(processes)]
    if gpu.get("index") is None:
        gpu["index"] = position
    return gpu


def _process(value, where):
    process = _object(value, PROCESS_FIELDS, where)
    if process.get("pid") is None:
        raise PushError(f"{where}.pid", "is missing")
    return process


def _depth(value):
    """Return how deeply lists and objects nest in `value`, without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        node, depth = stack.pop()
        deepest = max(deepest, depth)
        if isinstance(node, dict):
            stack.extend((child, depth + 1) for child in node.values())
        elif isinstance(node, list):
            stack.extend((child, depth + 1) for child in node)
    return deepest


def _reject_constant(name):
    raise PushError("body", f"{name} is not a number JSON allows; send null for a missing value")


def _unique_keys(pairs):
    """Build an object, refusing a key given twice: parsers disagree on which one wins."""
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen = set()
        for key, _ in pairs:
            if key in seen:
                raise PushError("body", f"the key {ascii(key)[:60]} appears twice in one object")
            seen.add(key)
    return obj


def decode(body):
    """Decode a UTF-8 JSON body; NaN, Infinity, out-of-range literals and duplicate keys are refused.

    A leading UTF-8 byte order mark is skipped, as RFC 8259 allows (Windows tools add one).
    """
    try:
        text = body.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise PushError("body", f"is not valid UTF-8 (byte {error.start})") from None
    try:
        return json.loads(text, parse_constant=_reject_constant, object_pairs_hook=_unique_keys)
    except PushError:
        raise
    except RecursionError:
        raise PushError("body", "is nested too deeply") from None
    except ValueError as error:
        if "integer string conversion" in str(error):  # Python's guard against quadratic parsing
            raise PushError("body", "holds a number of over 4,300 digits") from None
        raise PushError("body", f"is not valid JSON ({error})") from None


def validate(data):
    """Return the push as {host, sampledAt, error, agent, gpus}, or raise PushError naming the field.

    `error` says why a sample has no GPUs (nvidia-smi missing, driver not loaded...).
    """
    if not isinstance(data, dict):
        raise PushError("body", "must be a JSON object")
    if _depth(data) > MAX_DEPTH:
        raise PushError("body", "is nested too deeply")
    if "gpus" not in data:
        # The original agent's shape: one GPU object at the top level.
        if not any(name in data for name in GPU_FIELDS):
            raise PushError("gpus", "is missing: send {\"gpus\": [...]} or one GPU object")
        return {"host": None, "sampledAt": None, "error": None, "agent": None, "gpus": [_gpu(data, 0)]}
    gpus = data["gpus"]
    if not isinstance(gpus, list):
        raise PushError("gpus", "must be a list")
    if len(gpus) > MAX_GPUS:
        raise PushError("gpus", f"has {len(gpus)} entries, at most {MAX_GPUS} are accepted")
    checked = [_gpu(gpu, i) for i, gpu in enumerate(gpus)]
    seen = set()
    for i, gpu in enumerate(checked):
        if gpu["index"] in seen:
            raise PushError(f"gpus[{i}].index", f"{gpu['index']} is used twice")
        seen.add(gpu["index"])
    top = _object(data, {"host": _string, "sampledAt": _number(0, 1e11), "error": _string}, "")
    agent = data.get("agent")
    return {"host": top.get("host"), "sampledAt": top.get("sampledAt"), "error": top.get("error"),
            "agent": None if agent is None else _object(agent, AGENT_FIELDS, "agent"),
            "gpus": checked}

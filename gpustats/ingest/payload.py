"""Check a push body and return only the validated, known fields."""
import json
import math
import re
from itertools import compress

import orjson

MAX_STRING = 128
MAX_GPUS = 64
MAX_PROCESSES = 64
MAX_DISKS = 16
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
    check.bounds, check.integer = number.bounds, True
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

YEAR_2000 = 946_684_800  # a process's start before this is a clock that was never set, not a start
START_SLACK_S = 60  # how far past its push's sampledAt a process may say it started: clocks tick apart by a second

# `command` is the program and its script (`python3 train.py`); `startedAt` tells two runs of it apart.
PROCESS_FIELDS = {"pid": _integer(0, 2**32), "name": _string, "user": _string, "command": _string,
                  "startedAt": _number(YEAR_2000, 1e11), "memoryUsed": MIB}
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
# The PC around the GPUs (SPEC, "The host"). Each value is checked on its own, as a GPU's are: no
# reading is refused for disagreeing with another (a disk's used beside its total), since a refused
# push takes the PC's GPUs off the dashboard too. Bounds refuse nonsense only: 8 PiB of memory or
# disk, 8 Tbit/s, a load of a million, a century of uptime.
HOST_MIB = _number(0, 1 << 33)
SYSTEM_FIELDS = {
    "os": _string, "cpuModel": _string, "cpuCount": _integer(1, 100_000), "cpuPercent": PERCENT,
    "load1": _number(0, 1_000_000), "memoryTotal": HOST_MIB, "memoryUsed": HOST_MIB, "swapUsed": HOST_MIB,
    "netRx": _number(0, 1e12), "netTx": _number(0, 1e12), "temperatureCpu": CELSIUS,
    "uptimeS": _number(0, 100 * 365.25 * 86400),
}
DISK_FIELDS = {"mount": _string, "total": HOST_MIB, "used": HOST_MIB}
TOP_FIELDS = {"host": _string, "sampledAt": _number(0, 1e11), "error": _string}


NUMBER, INTEGER, STRING, BOOLEAN = range(4)
# Anything a string may not hold, in one search: only a string that is not plain printable ASCII needs it.
BAD_TEXT = re.compile(f"{SURROGATE.pattern}|{CONTROL.pattern}")


def _plan(fields):
    """Return each field's (name, kind, low, high, check): what the fast path needs to pass a good value."""
    def kind(check):
        return (STRING if check is _string else BOOLEAN if check is _boolean
                else INTEGER if getattr(check, "integer", False) else NUMBER)
    return tuple((name, kind(check), *getattr(check, "bounds", (None, None)), check) for name, check in fields.items())


def _object(value, plan, where):
    """Return the known fields of `value`, checked; unknown fields are dropped, null stays null.

    A value of the right type within bounds passes on the spot (a push holds some 200 of them);
    anything else goes to its field's check, which converts it (5.0 to 5 for a whole number)
    or raises the PushError that names it. Fields are checked in the order `plan` lists them,
    so the first bad one is always the one named.
    """
    if not isinstance(value, dict):
        raise PushError(where, "must be a JSON object")
    checked = {}
    for name, kind, low, high, check in plan:
        if name not in value:
            continue
        v = value[name]
        t = type(v)
        if v is None or (
                (t is int or t is float and v - v == 0) and low <= v <= high if kind == NUMBER
                else t is int and low <= v <= high if kind == INTEGER
                else t is str and len(v) <= MAX_STRING and ((v.isascii() and v.isprintable()) or not BAD_TEXT.search(v))
                if kind == STRING else t is bool):
            checked[name] = v
        else:
            checked[name] = check(v, f"{where}.{name}".lstrip("."))
    return checked


GPU_PLAN, PROCESS_PLAN, AGENT_PLAN, TOP_PLAN, SYSTEM_PLAN, DISK_PLAN = map(
    _plan, (GPU_FIELDS, PROCESS_FIELDS, AGENT_FIELDS, TOP_FIELDS, SYSTEM_FIELDS, DISK_FIELDS))


def _gpu(value, position):
    where = f"gpus[{position}]"
    gpu = _object(value, GPU_PLAN, where)
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
    process = _object(value, PROCESS_PLAN, where)
    if process.get("pid") is None:
        raise PushError(f"{where}.pid", "is missing")
    return process


def _system(value):
    """Return the host's known fields, checked like a GPU's; disks null stays null (the PC could not say)."""
    system = _object(value, SYSTEM_PLAN, "system")
    if "disks" in value:
        system["disks"] = None if value["disks"] is None else _disks(value["disks"])
    return system


def _disks(disks):
    """Return the host's disks, checked, each named by a mount given once: a chart and a metric are named by it."""
    if not isinstance(disks, list):
        raise PushError("system.disks", "must be a list")
    if len(disks) > MAX_DISKS:
        raise PushError("system.disks", f"has {len(disks)} entries, at most {MAX_DISKS} are accepted")
    checked, mounts = [], set()
    for i, disk in enumerate(disks):
        where = f"system.disks[{i}]"
        disk = _object(disk, DISK_PLAN, where)
        if disk.get("mount") is None:
            raise PushError(f"{where}.mount", "is missing")
        if disk["mount"] in mounts:
            raise PushError(f"{where}.mount", f"{disk['mount']} is listed twice")
        mounts.add(disk["mount"])
        checked.append(disk)
    return checked


CONTAINERS = (dict, list)
IS_CONTAINER = frozenset(CONTAINERS).__contains__


def _depth(value):
    """Return how deeply lists and objects nest in `value` (a number is 1, [1] is 2), without recursion.

    Level by level, visiting only the containers: a push's 200 numbers are looked at once each.
    """
    if type(value) not in CONTAINERS:
        return 1
    deepest, depth, level = 1, 1, [value]
    while level:
        below = []
        for node in level:
            children = node.values() if type(node) is dict else node
            if children:
                deepest = depth + 1
                below.extend(compress(children, map(IS_CONTAINER, map(type, children))))  # all in C
        level, depth = below, depth + 1
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


def _pairs(value):
    """Return how many key-value pairs the objects in `value` hold, all told (a walk of the containers alone)."""
    pairs, level = 0, [value] if type(value) in CONTAINERS else []
    while level:
        below = []
        for node in level:
            if type(node) is dict:
                pairs += len(node)
                node = node.values()
            below.extend(compress(node, map(IS_CONTAINER, map(type, node))))
        level = below
    return pairs


def decode(body):
    """Decode a UTF-8 JSON body; NaN, Infinity, out-of-range literals and duplicate keys are refused.

    orjson decodes first, faster than json (docs/PERFORMANCE.md), but it keeps the last of two
    equal keys where this refuses them. Every pair has its colon, so a body whose colons match
    the decoded pairs has no key twice; any other (a colon in a string, orjson refusing the
    body, a BOM) is decoded again by json, whose answer, or refusal, is the one given.
    """
    if not body.startswith(b"\xef\xbb\xbf"):
        try:
            data = orjson.loads(body)
        except orjson.JSONDecodeError:
            pass
        else:
            if _pairs(data) == body.count(b":"):
                return data
    return _decode_strictly(body)


def _decode_strictly(body):
    """json's decode, refusing duplicate keys and NaN, with the message that names what is wrong.

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
    """Return the push as {host, sampledAt, error, agent, gpus, system}, or raise PushError naming the field.

    `error` says why a sample has no GPUs (nvidia-smi missing, driver not loaded...).
    """
    if not isinstance(data, dict):
        raise PushError("body", "must be a JSON object")
    if _depth(data) > MAX_DEPTH:
        raise PushError("body", "is nested too deeply")
    return _checked(data)


def _checked(data):
    """validate() past its depth check: the fields, field by field."""
    if "gpus" not in data:
        # The original agent's shape: one GPU object at the top level.
        if not any(name in data for name in GPU_FIELDS):
            raise PushError("gpus", "is missing: send {\"gpus\": [...]} or one GPU object")
        return {"host": None, "sampledAt": None, "error": None, "agent": None, "gpus": [_gpu(data, 0)], "system": None}
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
    top = _object(data, TOP_PLAN, "")
    if top.get("sampledAt") is not None:
        _started_by(checked, top["sampledAt"] + START_SLACK_S)
    agent, system = data.get("agent"), data.get("system")
    return {"host": top.get("host"), "sampledAt": top.get("sampledAt"), "error": top.get("error"),
            "agent": None if agent is None else _object(agent, AGENT_PLAN, "agent"),
            "gpus": checked, "system": None if system is None else _system(system)}


def _started_by(gpus, latest):
    """Refuse a process that says it started after the push was sampled: a start in the future is no start."""
    for i, gpu in enumerate(gpus):
        for j, process in enumerate(gpu.get("processes") or ()):
            if (process.get("startedAt") or 0) > latest:
                raise PushError(f"gpus[{i}].processes[{j}].startedAt",
                                f"{_short(process['startedAt'])} is more than {START_SLACK_S} s after sampledAt")


BOM = b"\xef\xbb\xbf"
TOP_KNOWN, AGENT_KNOWN = frozenset(TOP_FIELDS) | {"gpus", "agent", "system"}, frozenset(AGENT_FIELDS)
GPU_KNOWN, PROCESS_KNOWN = frozenset(GPU_FIELDS) | {"processes"}, frozenset(PROCESS_FIELDS)
SYSTEM_KNOWN, DISK_KNOWN = frozenset(SYSTEM_FIELDS) | {"disks"}, frozenset(DISK_FIELDS)
# The list of child objects an object holds: the list's field, the children's known fields, their depth in a push.
CHILDREN = {GPU_KNOWN: ("processes", PROCESS_KNOWN, 5), SYSTEM_KNOWN: ("disks", DISK_KNOWN, 4)}


def parse(body):
    """Return validate(decode(body)), in one walk of the push where it can (the route's way), or raise the same.

    A push as agents send it is decoded by orjson; one walk of its objects counts its pairs
    (the duplicate-key proof of decode()) and measures the depth of its unknown fields only:
    the checks bound the rest (a known field holds a checked number or string). Then the
    same checks as validate() run. Anything that walk cannot prove, or the checks refuse,
    goes the whole way of decode() and validate(), whose answer is given.
    """
    if not body.startswith(BOM):
        try:
            data = orjson.loads(body)
        except orjson.JSONDecodeError:
            data = None
        pairs = _shape(data) if type(data) is dict and type(data.get("gpus")) is list else None
        if pairs is not None and pairs == body.count(b":"):
            try:
                return _checked(data)
            except PushError:
                pass
    return validate(decode(body))


def _unknown(value, known, depth):
    """Return the pairs inside `value`'s unknown fields, or None when one nests past MAX_DEPTH (at `depth` + its own)."""
    pairs = 0
    for name in value.keys() - known:
        child = value[name]
        if type(child) in CONTAINERS:
            if depth + _depth(child) > MAX_DEPTH:
                return None
            pairs += _pairs(child)
    return pairs


def _shape(data):
    """Return the pairs of a push whose only containers are where a push has them; None for any other."""
    extra = _unknown(data, TOP_KNOWN, 1)
    if extra is None:
        return None
    pairs = len(data) + extra
    objects = [(gpu, GPU_KNOWN, 3) for gpu in data["gpus"]]
    for name, known in (("agent", AGENT_KNOWN), ("system", SYSTEM_KNOWN)):
        if data.get(name) is not None:
            objects.append((data[name], known, 2))
    for value, known, depth in objects:
        if type(value) is not dict or (extra := _unknown(value, known, depth)) is None:
            return None
        pairs += len(value) + extra
        name, child, child_depth = CHILDREN.get(known, (None, None, None))
        children = value.get(name) if name else None
        if children is not None:
            if type(children) is not list:
                return None
            objects.extend((item, child, child_depth) for item in children)
    return pairs

"""Send alert messages: one thread a destination, retried with backoff until a deadline, in order."""
import json
import logging
import math
import random
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, field, replace
from email.utils import parsedate_to_datetime

import requests

from gpustats.alerts import formats

log = logging.getLogger("gpustats")
RETRY = {408, 425, 429}  # and every 5xx: the receiver may take it next time; other 4xx never will


@dataclass
class Item:
    """One alert waiting for one destination."""
    alert: dict
    deadline: float
    attempts: int = 0
    next_at: float = 0.0
    error: str = ""
    raw: bytes = field(default=b"", compare=False, repr=False)  # as the Redis outbox stored it
    row: int = field(default=0, compare=False, repr=False)  # its row in the SQLite outbox


def encode_item(item):
    """Return an outbox item as the JSON text an outbox keeps (SQLite, Redis)."""
    return json.dumps({"alert": item.alert, "deadline": item.deadline, "attempts": item.attempts,
                       "nextAt": item.next_at, "error": item.error})


def decode_item(raw, row=0):
    """Return the Item an outbox kept as `raw` (in row `row` of the SQLite one)."""
    data = json.loads(raw)
    return Item(data["alert"], data["deadline"], data["attempts"], data["nextAt"], data["error"], raw=raw, row=row)


class MemoryOutbox:
    """Alerts waiting to be sent, a FIFO queue per destination, in this process."""

    def __init__(self, destinations, clock=time.time, give_up_s=600):
        self._queues = {d.id: deque() for d in destinations}
        self._clock, self._give_up_s = clock, give_up_s
        self._lock = threading.Lock()

    def put(self, alert):
        """Queue `alert` for every destination, to be sent within `give_up_s`."""
        self.add(self.prepare([alert]))

    def prepare(self, alerts):
        """Return [(destination id, Item)] that queue `alerts` for every destination; nothing is queued yet."""
        deadline = self._clock() + self._give_up_s
        return [(destination, Item(alert, deadline)) for alert in alerts for destination in self._queues]

    def add(self, items):
        """Queue what prepare() returned (once it is kept, where it is kept): from now on it is sent."""
        with self._lock:
            for destination, item in items:
                self._queues[destination].append(item)

    def head(self, destination):
        """Return a copy of the next item for `destination`, or None."""
        with self._lock:
            queue = self._queues[destination.id]
            return replace(queue[0]) if queue else None

    def later(self, destination, item, attempts, next_at, error):
        """Record a failed attempt on the head, if it is still `item`; return the head as changed, or None."""
        with self._lock:
            queue = self._queues[destination.id]
            if queue and queue[0] == item:
                queue[0] = replace(queue[0], attempts=attempts, next_at=next_at, error=error)
                return queue[0]
        return None

    def done(self, destination, item):
        """Take the head off, if it is still `item`: sent, failed for good, or dropped; return it, or None."""
        with self._lock:
            queue = self._queues[destination.id]
            if queue and queue[0] == item:
                return queue.popleft()
        return None

    def pending(self):
        """Return how many messages wait, all destinations together."""
        with self._lock:
            return sum(map(len, self._queues.values()))


def describe(error):
    """Name a failed request without requests' own text, which holds the URL and its secret path."""
    cause = error
    for _ in range(10):
        if cause is None:
            break
        if isinstance(cause, OSError) and cause.strerror:
            return f"{type(error).__name__} ({cause.strerror})"
        cause = cause.__cause__ or cause.__context__
    return type(error).__name__


def retry_after(answer, now):
    """Return the seconds an answer asks to wait: Retry-After (seconds or HTTP-date), Discord's retry_after."""
    waits = []
    header = answer.headers.get("Retry-After", "").strip()
    try:
        waits.append(float(header))
    except ValueError:
        try:
            waits.append(parsedate_to_datetime(header).timestamp() - now)
        except (TypeError, ValueError):
            pass
    if answer.headers.get("Content-Type", "").startswith("application/json"):
        try:  # float seconds in Discord's current docs (older ones said milliseconds)
            waits.append(float(answer.json()["retry_after"]))
        except (ValueError, TypeError, KeyError):
            pass
    return max([w for w in waits if math.isfinite(w)] + [0.0])


class Sender:
    """Deliver what the outbox holds, each destination from a thread of its own, while allowed to."""

    def __init__(self, destinations, outbox, external_url="", session=None, clock=time.time,
                 timeout=(5, 10), backoff=(2.0, 120.0), lease=None, poll_s=0.5, counters=None):
        self.destinations, self.outbox, self.external_url = tuple(destinations), outbox, external_url
        self.timeout = timeout
        self._session, self._clock, self._poll_s = session, clock, poll_s
        self._base, self._cap = backoff
        self._lease = getattr(lease, "held", lease)  # None: this process sends alone
        self._lease_s = getattr(lease, "ms", 3000) / 3000  # renewed three times a term
        self._leader = lease is None
        self._stop = threading.Event()
        self._counts, self._counts_lock = Counter(), threading.Lock()
        self._counters = counters  # the server's, for /metrics: results by themselves

    @property
    def counts(self):
        """Return {(kind, result): attempts} for result sent, retry, failed or dropped."""
        with self._counts_lock:
            return dict(self._counts)

    def _count(self, destination, result):
        with self._counts_lock:
            self._counts[destination.kind, result] += 1
        if self._counters is not None:
            self._counters.add("notifications", result)

    def start(self):
        """Start a named daemon thread per destination (and one for the lease)."""
        for destination in self.destinations:
            threading.Thread(target=self._run, args=(destination,), daemon=True,
                             name=f"alert-sender-{destination.kind}-{destination.id}").start()
        if self._lease is not None and self.destinations:
            threading.Thread(target=self._hold_lease, name="alert-lease", daemon=True).start()

    def close(self):
        """Stop every thread soon (a send in flight ends first); only sets an event, so a signal handler may call it."""
        self._stop.set()

    def _hold_lease(self):
        # A thread of its own renews the lease, so a slow send does not let it lapse meanwhile.
        failing = False
        while not self._stop.is_set():
            try:
                self._leader, failing = bool(self._lease()), False
            except Exception as error:
                self._leader = False
                if not failing:
                    log.warning("alert sender: cannot take or renew its lease (%s); it keeps trying", error)
                failing = True
            self._stop.wait(self._lease_s)

    def _run(self, destination):
        session = self._session or requests.Session()
        failing = False
        while not self._stop.is_set():
            try:
                wait = self._step(session, destination)
                if failing:
                    log.info("alert sender for %s works again", destination.label)
                failing = False
            except Exception:  # the outbox is out of reach (Redis down): say so once, go on
                if not failing:
                    log.exception("alert sender for %s failed; it goes on", destination.label)
                failing, wait = True, self._poll_s
            self._stop.wait(wait)

    def _step(self, session, destination):
        """Try the head once if it is due; return how long to wait before looking again."""
        if not self._leader:
            return self._poll_s
        item = self.outbox.head(destination)
        if item is None:
            return self._poll_s
        now = self._clock()
        if item.deadline <= now:  # its turn came too late (a hung receiver ahead of it): a late page misleads
            self._retry(destination, item, item.attempts, item.error or "none tried before the deadline", 0.0)
            return 0
        due = item.next_at - now
        if due > 0:
            return min(due, self._poll_s)
        self._attempt(session, destination, item)
        return 0

    def _attempt(self, session, destination, item):
        alert, attempts = item.alert, item.attempts + 1
        try:
            message = formats.message(destination, alert, self.external_url)
        except Exception:  # one malformed alert must not block the ones behind it
            log.exception("alert %s cannot be written for %s; skipped", alert.get("alertname"), destination.label)
            self.outbox.done(destination, item)
            return self._count(destination, "failed")
        if message is None:
            return self.outbox.done(destination, item)
        url, headers, body = message
        try:
            answer = session.post(url, json=body, headers=headers, timeout=self.timeout, allow_redirects=False)
        except Exception as error:
            return self._retry(destination, item, attempts, describe(error), 0.0)
        status = answer.status_code
        if 200 <= status < 300:
            self.outbox.done(destination, item)  # first: a count seen means the outbox is past it
            return self._count(destination, "sent")
        if status in RETRY or status >= 500:
            return self._retry(destination, item, attempts, f"HTTP {status}", retry_after(answer, self._clock()))
        log.warning("alert %s %s for %s not sent to %s: HTTP %d %s; not retried", alert["alertname"],
                    alert["status"], formats.where(alert), destination.label, status,
                    formats.fit(formats.clean(answer.text[:400]), 200))
        self.outbox.done(destination, item)
        self._count(destination, "failed")

    def _retry(self, destination, item, attempts, error, at_least):
        """Try again after full-jitter backoff, or at least `at_least`; past the deadline, drop it."""
        now = self._clock()
        left = item.deadline - now
        # A Retry-After reaching past the deadline says the receiver will not take it in time.
        if left <= 0 or at_least > left:
            alert = item.alert
            log.warning("alert %s %s for %s dropped: not sent to %s in %d attempts (last: %s)", alert["alertname"],
                        alert["status"], formats.where(alert), destination.label, attempts, error)
            self.outbox.done(destination, item)
            return self._count(destination, "dropped")
        wait = max(random.uniform(0, min(self._cap, self._base * 2 ** min(attempts - 1, 30))), at_least)
        self.outbox.later(destination, item, attempts, now + min(wait, left), error)
        self._count(destination, "retry")

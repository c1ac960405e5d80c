"""Background work every part runs the same way: a named loop that logs its failures once, and a tally of a lasting trouble."""
import logging
import threading
import time

log = logging.getLogger("gpustats")


def watch(name, period_s, work, closed):
    """Run `work` every `period_s` in a named thread until `closed()`; a failure is logged, never fatal.

    A failure is logged with its traceback the first time, then not again while the same kind
    repeats (a full disk failed each write twice a second), and its end is logged with a count.
    """
    def loop():
        failing, repeats = None, 0
        while not closed():
            time.sleep(period_s)
            if closed():  # closed while it slept: its store may be gone, and a last round would only fail
                return
            try:
                work()
            except Exception as problem:  # never silently gone: say so loudly, and keep going
                if type(problem) is not failing:
                    log.exception("%s failed; it goes on (this failure again is not logged)", name)
                    failing, repeats = type(problem), 0
                else:
                    repeats += 1
            else:
                if failing is not None:
                    log.info("%s works again, after %d more failures of that kind", name, repeats)
                    failing = None
    threading.Thread(target=loop, name=name, daemon=True).start()


class Tally:
    """Count what a lasting trouble costs, and say it at once, then once a minute while it lasts."""

    def __init__(self, say, every_s=60.0, clock=time.monotonic):
        self._say = say  # ({what: n} counted since the last line) -> None
        self._every_s, self._clock = every_s, clock
        self._counts, self._said_at = {}, None
        self._lock = threading.Lock()

    def add(self, what, n=1):
        """Count `n` of `what`; log the counts if it is time to."""
        with self._lock:
            self._counts[what] = self._counts.get(what, 0) + n
            now = self._clock()
            if self._said_at is not None and now - self._said_at < self._every_s:
                return
            counts, self._counts, self._said_at = self._counts, {}, now
        self._say(counts)

    def clear(self):
        """The trouble is over: the next one is said at once; return what was counted since the last line."""
        with self._lock:
            counts, self._counts, self._said_at = self._counts, {}, None
        return counts


def counted(counts):
    """Return {what: n} as one line: "pushes 12, history-writer rounds 3"."""
    return ", ".join(f"{what} {n}" for what, n in sorted(counts.items())) or "nothing"

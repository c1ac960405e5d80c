"""Keep long work from stalling the event loop: blocking calls in an OS thread, Python loops in slices.

Under gunicorn's gevent worker every "thread" is a greenlet on one OS thread: a SQLite call
or a long loop in Python there stalls every push and stream until it returns.
- A blocking call that runs without the GIL (SQLite) goes to an OS thread: gevent's
  ThreadPool runs it and the calling greenlet waits without blocking the loop; without
  gevent (tests, scripts), a plain thread does the same job.
- A long loop in Python must not go there: it holds the GIL, and the loop's thread, which
  gives the GIL up at every socket call, waits a switch interval to get it back each time
  (CPython's convoy effect: viewers' writes came late, docs/PERFORMANCE.md). It stays on the loop and
  calls cooperate() every millisecond or so of work instead.
"""
import time
from concurrent.futures import ThreadPoolExecutor


def cooperate():
    """Let the event loop run whatever is ready (pushes, streams), then come back."""
    time.sleep(0)  # gevent's sleep once monkey-patched: a yield to the loop; otherwise next to nothing


def in_slices(items, size=200):
    """Yield `items`, letting the event loop run between slices of `size` (about a millisecond of work each)."""
    for i, item in enumerate(items):
        if i % size == size - 1:
            cooperate()
        yield item


def gevent_running():
    """Return whether gevent has patched threading: we run in gunicorn's gevent worker."""
    try:
        from gevent import monkey
    except ImportError:
        return False
    return monkey.is_module_patched("threading")


class Worker:
    """One OS thread that runs the calls handed to it one at a time, in order (for calls that drop the GIL)."""

    def __init__(self, name):
        if gevent_running():
            from gevent.threadpool import ThreadPool
            self._pool = ThreadPool(1)
            self._run = lambda fn, args: self._pool.apply(fn, args)
        else:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix=name)
            self._run = lambda fn, args: self._pool.submit(fn, *args).result()

    def run(self, fn, *args):
        """Return fn(*args), computed in this worker's thread; its exception is raised here."""
        return self._run(fn, args)

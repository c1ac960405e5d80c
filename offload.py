"""Run blocking calls (SQLite, big encodes) in an OS thread, so the event loop keeps serving meanwhile.

Under gunicorn's gevent worker every "thread" is a greenlet on one OS thread: a SQLite call
or a long loop in Python there stalls every push and stream until it returns. gevent's
ThreadPool runs the call in a real thread and the calling greenlet waits without blocking
the loop; without gevent (tests, scripts), a plain thread does the same job.
"""
from concurrent.futures import ThreadPoolExecutor


def _gevent_running():
    try:
        from gevent import monkey
    except ImportError:
        return False
    return monkey.is_module_patched("threading")


class Worker:
    """One OS thread that runs the calls handed to it one at a time, in order."""

    def __init__(self, name):
        if _gevent_running():
            from gevent.threadpool import ThreadPool
            self._pool = ThreadPool(1)
            self._run = lambda fn, args: self._pool.apply(fn, args)
        else:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix=name)
            self._run = lambda fn, args: self._pool.submit(fn, *args).result()

    def run(self, fn, *args):
        """Return fn(*args), computed in this worker's thread; its exception is raised here."""
        return self._run(fn, args)

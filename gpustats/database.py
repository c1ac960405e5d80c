"""The SQLite file HISTORY_DB, which alerts, accounts and devices keep their tables in beside history: how each opens it."""
import sqlite3
from contextlib import contextmanager


def sqlite_file(path, schema):
    """Open the SQLite file `path` (in memory if empty) as the server's parts share it, with `schema` made.

    Call it in the Worker that will use the connection: WAL lets the other parts' threads read and
    write beside it, and a busy file is waited on for 10 s, not refused.
    """
    db = sqlite3.connect(path or ":memory:", timeout=10, isolation_level=None, check_same_thread=False)
    db.execute("PRAGMA busy_timeout = 10000")
    if path:
        db.execute("PRAGMA journal_mode = WAL")
    db.executescript(schema)
    return db


@contextmanager
def transaction(db):
    """Run the block in one write transaction of `db`, rolled back if it raises."""
    db.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        if db.in_transaction:  # SQLite may have rolled back already (a full disk): keep the real error
            db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")

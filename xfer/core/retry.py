"""Retrying a tracking-store call that met a parallel writer (SQLite's lock, a racing upsert): core machinery
every group may use, so that logging from a network or a device helper needs no tracking import."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")

# Store answers that a parallel writer caused and a retry resolves: SQLite's lock (two writers upgrading their
# locks at once fail at once, whatever the busy timeout), and two upserts of the same key (an experiment tag, an
# alias) that both tried to insert it (PostgreSQL behind a server; the retry finds the row and updates it).
TRANSIENT = ("database is locked", "duplicate key value violates unique constraint", "UNIQUE constraint failed")


def retry_locked(fn: Callable[..., T], *args: Any, attempts: int = 8, also: tuple[str, ...] = (), **kwargs: Any) -> T:
    """Call an MLflow function, retrying with backoff on a ``TRANSIENT`` conflict with a parallel writer (or on one
    of the texts in ``also``: e.g. a schema another process created between our check and our CREATE TABLE)."""
    for attempt in range(attempts):
        try:
            return fn(*args, **kwargs)
        except Exception as exc:  # MlflowException or sqlalchemy's OperationalError, depending on the call
            if not any(text in str(exc) for text in TRANSIENT + also) or attempt == attempts - 1:
                raise
            time.sleep(min(0.25 * 2**attempt, 8.0))
    raise AssertionError("unreachable")

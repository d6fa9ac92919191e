"""The MLflow tracking store: where it is, and safe concurrent use of a SQLite database."""

from __future__ import annotations

import fcntl
import os
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from xfer.config import repo_root

SQLITE_BUSY_S = 60.0  # how long our own connection waits for SQLite's lock
T = TypeVar("T")


def tracking_uri() -> str:
    """``MLFLOW_TRACKING_URI`` if set, else ``sqlite:///<repo root>/mlruns/mlflow.db`` (absolute)."""
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    db = repo_root() / "mlruns" / "mlflow.db"
    db.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{db}"


def retry_locked(fn: Callable[..., T], *args: Any, attempts: int = 8, **kwargs: Any) -> T:
    """Call an MLflow function, retrying with backoff while SQLite answers "database is locked" (two writers
    upgrading their locks at once fail at once, whatever the busy timeout)."""
    for attempt in range(attempts):
        try:
            return fn(*args, **kwargs)
        except Exception as exc:  # MlflowException or sqlalchemy's OperationalError, depending on the call
            if "database is locked" not in str(exc) or attempt == attempts - 1:
                raise
            time.sleep(min(0.25 * 2**attempt, 8.0))
    raise AssertionError("unreachable")


def prepare_database(uri: str) -> None:
    """Safe concurrent use of a SQLite tracking database: the schema is created (or upgraded) by one process at
    a time, under a file lock beside the database, and the WAL journal lets readers and one writer work at once
    (writes that still meet a locked database are retried by :func:`retry_locked`)."""
    if not uri.startswith("sqlite:///"):
        return
    import mlflow

    db = Path(uri.removeprefix("sqlite:///"))
    db.parent.mkdir(parents=True, exist_ok=True)
    with open(db.with_name(db.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            conn = sqlite3.connect(db, timeout=SQLITE_BUSY_S)
            try:
                conn.execute("PRAGMA journal_mode=WAL")  # readers (mlflow ui, compare) never block writers
            finally:
                conn.close()
            client = mlflow.MlflowClient(uri, registry_uri=uri)  # creates/verifies the tracking schema
            client.search_experiments(max_results=1)
            client.search_registered_models(max_results=1)  # and the model registry's
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)

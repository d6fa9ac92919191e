"""The MLflow tracking store: where it is, a one-line error when a tracking server cannot be used, and safe
concurrent use of a SQLite database."""

from __future__ import annotations

import fcntl
import os
import sqlite3
from pathlib import Path

from xfer import XferError
from xfer.core.config import repo_root

SQLITE_BUSY_S = 60.0  # how long our own connection waits for SQLite's lock
SERVER_TIMEOUT_S = 15.0  # for the one request that checks a tracking server


def tracking_uri() -> str:
    """``MLFLOW_TRACKING_URI`` if set, else ``sqlite:///<repo root>/mlruns/mlflow.db`` (absolute)."""
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    db = repo_root() / "mlruns" / "mlflow.db"
    db.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{db}"


def check_server(uri: str) -> None:
    """For an ``http(s)://`` tracking URI: fail in one line, before a stage starts, when no MLflow server answers,
    when it refuses our credentials (``MLFLOW_TRACKING_USERNAME``/``_PASSWORD``), or when it cannot list the
    artifact store it proxies (e.g. a missing bucket), instead of MLflow's retries and stack trace mid-stage."""
    if not uri.startswith(("http://", "https://")):
        return
    import requests

    user, password = os.environ.get("MLFLOW_TRACKING_USERNAME"), os.environ.get("MLFLOW_TRACKING_PASSWORD")
    auth, api = ((user, password or "") if user else None), f"{uri.rstrip('/')}/api/2.0"
    where = f"MLFLOW_TRACKING_URI={uri}"
    try:
        answer = requests.get(f"{api}/mlflow/experiments/search", params={"max_results": 1}, auth=auth,
                              timeout=SERVER_TIMEOUT_S)
        if answer.status_code in (401, 403):
            given = "were refused" if user else "are needed"
            raise XferError(f"{where}: the server's credentials {given} (HTTP {answer.status_code}); set "
                            "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD")
        if answer.status_code != 200:
            raise XferError(f"{where}: not an MLflow server (HTTP {answer.status_code} from its REST API); "
                            "check the URL")
        store = requests.get(f"{api}/mlflow-artifacts/artifacts", auth=auth, timeout=SERVER_TIMEOUT_S)
    except requests.RequestException as exc:
        raise XferError(f"{where}: no MLflow server answers ({type(exc).__name__}); start it (`xfer stack up` "
                        "for the local team stack) or unset MLFLOW_TRACKING_URI to use "
                        "mlruns/mlflow.db") from None
    try:  # an error of the artifact proxy comes as MLflow JSON (a server that proxies nothing has no such route)
        problem = store.json().get("message") if store.status_code != 200 else None
    except ValueError:
        problem = None
    if problem:
        raise XferError(f"{where}: the server cannot use its artifact store ({' '.join(problem.split())[:160]}); "
                        "create the bucket or fix the server's --artifacts-destination and its S3 credentials")


def answers(uri: str) -> bool:
    """Whether the tracking store can be used right now (a server answers within ``SERVER_TIMEOUT_S``)."""
    try:
        check_server(uri)
    except XferError:
        return False
    return True


def prepare_database(uri: str) -> None:
    """Make the tracking store ready. A server is checked (:func:`check_server`). A SQLite database is made safe
    for concurrent use: the schema is created (or upgraded) by one process at a time, under a file lock beside
    the database, and the WAL journal lets readers and one writer work at once (writes that still meet a locked
    database are retried by :func:`retry_locked`)."""
    check_server(uri)
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
            # Creates or verifies the schema: one set of migrations for the tracking and the registry tables,
            # so the registry store that evaluate opens later finds them at the current version.
            mlflow.MlflowClient(uri).search_experiments(max_results=1)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)

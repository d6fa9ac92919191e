"""MLflow tracking shared by the stages: one run per stage, tagged so the runs of one pipeline line up."""

from __future__ import annotations

import fcntl
import os
import socket
import sqlite3
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from omegaconf import DictConfig, OmegaConf

from xfer.config import project_root, repo_root
from xfer.data import RUNS
from xfer.files import read_json, write_json
from xfer.signals import interrupted

# Which stages' runs each stage links back to (their run ids are read from reports/runs/<stage>.json).
UPSTREAM = {
    "download": [],
    "split": ["download"],
    "featurize": ["split"],
    "views": ["featurize"],
    "trunk": ["featurize"],
    "train_head": ["featurize", "views"],
    "finetune": ["train_head", "featurize", "trunk"],
    "evaluate": ["finetune", "train_head"],
}


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


def _process_alive(pid: int, started: float) -> bool:
    import psutil

    try:
        return abs(psutil.Process(pid).create_time() - started) < 1.0
    except (psutil.Error, ValueError):
        return False


def close_abandoned_runs(experiment_id: str) -> list[str]:
    """Mark KILLED the RUNNING runs of this experiment whose stage process (on this host) no longer exists,
    e.g. after a SIGKILL or a power cut; return their ids."""
    import mlflow

    client = mlflow.MlflowClient()
    host, closed = socket.gethostname(), []
    for run in client.search_runs([experiment_id], "attributes.status = 'RUNNING'", max_results=1000):
        tags = run.data.tags
        if tags.get("xfer.host") != host or "xfer.pid" not in tags:
            continue
        if not _process_alive(int(tags["xfer.pid"]), float(tags.get("xfer.pid_started", 0))):
            retry_locked(client.set_tag, run.info.run_id, "xfer.closed_because",
                         "its process ended without closing the run")
            retry_locked(client.set_terminated, run.info.run_id, "KILLED")
            closed.append(run.info.run_id)
    return closed


def pipeline_id() -> str:
    """Shared by the stages of one ``dvc repro``/``dvc exp run``: derived from the DVC process running them.

    ``XFER_PIPELINE_ID`` overrides it; a stage run by hand outside DVC gets a fresh id.
    """
    if os.environ.get("XFER_PIPELINE_ID"):
        return os.environ["XFER_PIPELINE_ID"]
    import psutil

    proc = psutil.Process().parent()
    while proc is not None:
        try:
            cmd = " ".join(proc.cmdline()[:3])
        except psutil.Error:
            break
        if "dvc" in Path(cmd.split(" ")[0]).name or " -m dvc" in cmd or "/dvc " in f"{cmd} ":
            stamp = time.strftime("%Y%m%dT%H%M%S", time.localtime(proc.create_time()))
            return f"{stamp}-{proc.pid}"
        proc = proc.parent()
    return f"manual-{uuid.uuid4().hex[:12]}"


def experiment_name(cfg: DictConfig) -> str:
    """The MLflow experiment of a pipeline: ``mlflow.experiment``, or the data set's name when that is null."""
    return cfg.mlflow.experiment or cfg.data.name


def set_experiment(name: str, artifacts: str | None) -> str:
    """Select (creating if needed) the experiment. With our own database, artifacts go to ``artifacts``
    (<repo root>/mlruns/artifacts), not to a path relative to the (possibly temporary) working directory.
    Returns the experiment id."""
    import mlflow

    if artifacts and mlflow.get_experiment_by_name(name) is None:
        try:
            mlflow.create_experiment(name, artifact_location=artifacts)
        except mlflow.exceptions.MlflowException:
            pass  # created meanwhile by a parallel run
    return retry_locked(mlflow.set_experiment, name).experiment_id


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10,
                             cwd=project_root())
        return out.stdout.strip() if out.returncode == 0 else "none"
    except (OSError, subprocess.SubprocessError):
        return "none"


def flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    """``{"head": {"units": 256}}`` -> ``{"head.units": 256}``."""
    if isinstance(d, DictConfig):
        d = OmegaConf.to_container(d, resolve=True)
    if not isinstance(d, dict):
        return {prefix: d}
    out: dict[str, Any] = {}
    for key, value in d.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        out.update(flatten(value, name) if isinstance(value, dict) else {name: value})
    return out


def upstream_runs(stage: str) -> dict[str, str]:
    """Run ids of the upstream stages that produced this stage's inputs."""
    links = {}
    for up in UPSTREAM[stage]:
        path = RUNS / f"{up}.json"
        if path.is_file():
            links[up] = read_json(path)["run_id"]
    return links


@contextmanager
def stage_run(stage: str, cfg: DictConfig, sections: list[str]) -> Iterator[Any]:
    """Start the MLflow run of one stage, log its params, and record its run id in reports/runs/<stage>.json."""
    import mlflow
    import psutil

    from xfer.runtime import quiet_mlflow

    quiet_mlflow()
    own_db = not os.environ.get("MLFLOW_TRACKING_URI")  # read first: set_tracking_uri() sets the variable
    uri = tracking_uri()
    prepare_database(uri)
    mlflow.set_tracking_uri(uri)
    artifacts = (repo_root() / "mlruns" / "artifacts").as_uri() if own_db else None
    close_abandoned_runs(set_experiment(experiment_name(cfg), artifacts))
    pid = pipeline_id()
    tags = {
        "stage": stage,
        "backbone": cfg.backbone.name,
        "dataset": cfg.data.name,
        "pipeline_id": pid,
        "git_commit": git_commit(),
        "dvc_exp_name": os.environ.get("DVC_EXP_NAME", ""),
        "xfer.host": socket.gethostname(),
        "xfer.pid": str(os.getpid()),
        "xfer.pid_started": str(psutil.Process().create_time()),
    }
    tags.update({f"upstream.{up}": run_id for up, run_id in upstream_runs(stage).items()})
    with retry_locked(mlflow.start_run, run_name=f"{stage}-{cfg.backbone.name}", tags=tags) as run:
        params = {}
        for section in sections:
            params.update(flatten(OmegaConf.select(cfg, section), section))
        retry_locked(mlflow.log_params, {k: ("null" if v is None else v) for k, v in params.items()})
        try:
            yield run
        except BaseException as exc:  # Ctrl-C or SIGTERM (see config.run_cli): KILLED, not FAILED
            if interrupted(exc):
                retry_locked(mlflow.end_run, "KILLED")
            raise
        write_json(RUNS / f"{stage}.json", {
            "stage": stage, "run_id": run.info.run_id, "experiment_id": run.info.experiment_id,
            "pipeline_id": pid, "tracking_uri": mlflow.get_tracking_uri(),
        })


def epoch_logger():
    """A Keras callback logging each epoch's logs (loss, accuracy, val_*, lr) and its wall time, validation
    included (``epoch_seconds``; also kept in its ``seconds`` list), to the active MLflow run. Put it after the
    callbacks that validate."""
    import keras
    import mlflow

    class EpochLogger(keras.callbacks.Callback):
        seconds: list[float] = []

        def on_train_begin(self, logs: dict | None = None) -> None:
            self.seconds = []

        def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
            self.started = time.perf_counter()

        def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
            self.seconds.append(time.perf_counter() - self.started)
            metrics = {k: float(v) for k, v in (logs or {}).items()}
            retry_locked(mlflow.log_metrics, {**metrics, "epoch_seconds": self.seconds[-1]}, step=epoch)

    return EpochLogger()

"""MLflow on SQLite under concurrent stages: the schema is created once, locked writes are retried, runs of
killed processes are closed."""

from __future__ import annotations

import multiprocessing
import os
import socket
import subprocess
import sys

import pytest

from tests.conftest import REPO
from xfer import XferError
from xfer.core.retry import retry_locked
from xfer.track.runs import close_abandoned_runs
from xfer.track.store import prepare_database


def _first_run(uri: str, name: str, barrier) -> str:
    import mlflow

    barrier.wait()  # every process hits the fresh database at the same moment
    prepare_database(uri)
    client = mlflow.MlflowClient(uri)
    try:
        exp = client.create_experiment("race")
    except mlflow.exceptions.MlflowException:
        exp = client.get_experiment_by_name("race").experiment_id
    run = retry_locked(client.create_run, exp, run_name=name)
    for step in range(5):
        retry_locked(client.log_metric, run.info.run_id, "m", step, step=step)
    retry_locked(client.set_terminated, run.info.run_id)
    return run.info.run_id


def test_parallel_first_use_of_a_fresh_database(tmp_path):
    """Four processes start on a database that does not exist yet (two queued experiments' first stages):
    without the lock, two of them run MLflow's migrations at once ("table ... already exists")."""
    uri = f"sqlite:///{tmp_path}/mlruns/mlflow.db"
    ctx = multiprocessing.get_context("spawn")
    with ctx.Manager() as manager:
        barrier = manager.Barrier(4)
        with ctx.Pool(4) as pool:
            ids = pool.starmap(_first_run, [(uri, f"r{i}", barrier) for i in range(4)])
    import mlflow

    client = mlflow.MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("race").experiment_id])
    assert sorted(r.info.run_id for r in runs) == sorted(ids)
    assert all(r.info.status == "FINISHED" and r.data.metrics["m"] == 4 for r in runs)


def test_retry_locked_retries_only_a_parallel_writers_conflict(monkeypatch):
    monkeypatch.setattr("time.sleep", lambda s: None)
    calls = []

    def flaky(x):
        calls.append(x)
        if len(calls) < 3:
            raise RuntimeError("(sqlite3.OperationalError) database is locked")
        return x * 2

    assert retry_locked(flaky, 21) == 42 and len(calls) == 3

    def raced():  # two stages setting the same experiment tag at once through a server on PostgreSQL
        calls.append("r")
        if calls.count("r") < 2:
            raise RuntimeError('BAD_REQUEST: (psycopg2.errors.UniqueViolation) duplicate key value violates unique '
                               'constraint "experiment_tag_pk"')
        return "set"

    assert retry_locked(raced) == "set" and calls.count("r") == 2

    def broken():
        calls.append("b")
        raise RuntimeError("no such table: runs")

    calls.clear()
    with pytest.raises(RuntimeError, match="no such table"):
        retry_locked(broken)
    assert calls == ["b"]


def test_running_runs_of_dead_processes_are_marked_killed(tmp_path):
    import mlflow

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    prepare_database(uri)
    mlflow.set_tracking_uri(uri)
    client = mlflow.MlflowClient(uri)
    exp = client.create_experiment("e")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True).stdout.strip()
    host = socket.gethostname()
    orphan = client.create_run(exp, tags={"xfer.host": host, "xfer.pid": dead, "xfer.pid_started": "0"})
    import psutil

    me = psutil.Process()
    alive = client.create_run(exp, tags={"xfer.host": host, "xfer.pid": str(me.pid),
                                         "xfer.pid_started": str(me.create_time())})
    elsewhere = client.create_run(exp, tags={"xfer.host": "another-machine", "xfer.pid": dead})
    assert close_abandoned_runs(exp) == [orphan.info.run_id]
    assert client.get_run(orphan.info.run_id).info.status == "KILLED"
    assert client.get_run(alive.info.run_id).info.status == "RUNNING"
    assert client.get_run(elsewhere.info.run_id).info.status == "RUNNING"


def test_a_tracking_server_that_does_not_answer_is_one_line(tmp_path):
    """MLFLOW_TRACKING_URI names a server nobody started: the stage (and the leaderboard) says so in one line,
    before MLflow's retries, and suggests what to start."""
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{port}"}
    proc = subprocess.run([sys.executable, "-m", "xfer", "compare", "--out", str(tmp_path)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.startswith(f"error: MLFLOW_TRACKING_URI=http://127.0.0.1:{port}: no MLflow server answers")
    assert "xfer stack up" in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr
    with pytest.raises(XferError, match="no MLflow server answers"):
        prepare_database(f"http://127.0.0.1:{port}")  # what every stage calls first


def test_a_stage_that_loses_the_experiment_creation_race_logs_into_that_experiment(project, monkeypatch):
    """Two queued experiments' first stages create the experiment at the same moment (on a tracking server). The
    loser's create fails with RESOURCE_ALREADY_EXISTS; MLflow's own ``set_experiment(name)`` then returns the
    experiment without selecting it, and the stage's run went to the Default experiment (found by the e2e queue)."""
    import mlflow
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import RESOURCE_ALREADY_EXISTS
    from mlflow.tracking._tracking_service.client import TrackingServiceClient

    from xfer.core.config import load_params
    from xfer.track.runs import stage_run

    real_create = TrackingServiceClient.create_experiment  # under both MlflowClient and mlflow.set_experiment

    def parallel_winner(self, name, *args, **kwargs):
        real_create(self, name, *args, **kwargs)  # the other stage's create lands first
        raise MlflowException(f"Experiment(name={name}) already exists.", error_code=RESOURCE_ALREADY_EXISTS)

    monkeypatch.setattr(TrackingServiceClient, "create_experiment", parallel_winner)
    monkeypatch.setenv("XFER_PIPELINE_ID", "race")
    cfg = load_params(["data=synthetic"])
    with stage_run("split", cfg, ["split"]) as run:
        pass
    experiment = mlflow.MlflowClient().get_experiment_by_name("synthetic")
    assert run.info.experiment_id == experiment.experiment_id != "0"

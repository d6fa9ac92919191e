"""A tracking outage never costs training, on the real team stack (``xfer stack up``): the MLflow server is killed
while ``finetune`` runs under ``dvc repro``, and brought back only after the stage's client gave up on it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
import yaml

from tests.conftest import TINY, copy_project
from xfer.stack import control as xstack
from xfer.stack import services as svc

pytestmark = pytest.mark.stack
REPO = Path(__file__).resolve().parents[1]
EPOCHS = 4
# The stage's MLflow client gives up within seconds (defaults: 7 retries, minutes), its end waits 3 s for the server.
SHORT_RETRIES = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                 "MLFLOW_HTTP_REQUEST_TIMEOUT": "5", "XFER_TRACKING_WAIT": "3"}


def run(cmd: list[str], cwd: Path, env: dict) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def kill_server(folder: Path) -> None:
    """SIGKILL the mlflow server's whole process group (its leader and the workers that hold the port)."""
    pid, started = xstack.Stack.load(folder).procs["mlflow"]
    members = svc.group_members(int(pid), started)
    for proc in members:
        os.kill(proc.pid, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while any(p.is_running() and p.status() != "zombie" for p in members) and time.monotonic() < deadline:
        time.sleep(0.1)


def finetune_run(url: str) -> dict | None:
    """The finetune run on the server, straight from its REST API (one quick request)."""
    try:
        found = requests.post(f"{url}/api/2.0/mlflow/runs/search", timeout=2,
                              json={"experiment_ids": experiment_ids(url), "filter": "tags.stage = 'finetune'"})
        runs = found.json().get("runs", [])
    except (requests.RequestException, ValueError):
        return None
    return runs[0] if runs else None


def experiment_ids(url: str) -> list[str]:
    """This test's experiment only: the session's stack may hold other tests' finetune runs (the e2e team test)."""
    found = requests.post(f"{url}/api/2.0/mlflow/experiments/search", timeout=2,
                          json={"max_results": 100, "filter": "name = 'outage'"})
    return [e["experiment_id"] for e in found.json().get("experiments", [])]


def test_a_server_outage_during_finetune_costs_nothing_and_the_spool_replays_once(team_stack, tmp_path):
    from mlflow import MlflowClient

    team_stack["cli"]("up")  # a no-op when all runs; brings back a service an earlier test stopped
    root = copy_project(tmp_path / "repo")
    for name in (".gitignore", ".dvcignore"):
        (root / name).write_text((REPO / name).read_text())
    (root / ".dvc").mkdir()
    (root / ".dvc" / "config").write_text((REPO / ".dvc" / "config").read_text())
    (root / "mlruns").mkdir()
    (root / "mlruns" / ".gitignore").write_text((REPO / "mlruns" / ".gitignore").read_text())
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("MLFLOW_", "DVC_", "XFER_")) or k.startswith("XFER_WARM")}  # the suite's warm dir
    env.update(team_stack["client_env"], DVC_NO_ANALYTICS="1", MLFLOW_DISABLE_TELEMETRY="true",
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}")
    dvc = [sys.executable, "-m", "dvc"]
    run(["git", "init", "-q", "-b", "main"], root, env)
    run([sys.executable, "-m", "xfer", "params", *TINY, f"finetune.epochs={EPOCHS}", "finetune.patience=null",
         "mlflow.experiment=outage"], root, env)
    run([*dvc, "repro", "train_head", "trunk"], root, env)  # the server up: the upstream stages as usual
    url = team_stack["url"]

    stage_env = {**env, **SHORT_RETRIES}
    proc = subprocess.Popen([*dvc, "repro", "finetune"], cwd=root, env=stage_env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while (started := finetune_run(url)) is None:  # the run exists (its id from the server): now kill the server
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.2)
    kill_server(team_stack["dir"])
    out, err = proc.communicate(timeout=900)
    assert proc.returncode == 0, f"{out[-3000:]}\n{err[-3000:]}"
    lines = [line for line in err.splitlines() if line.startswith("tracking:")]
    assert len(lines) == 1 and "mlruns/spool/finetune-" in lines[0] and "xfer sync" in lines[0], err[-3000:]
    lock = yaml.safe_load((root / "dvc.lock").read_text())["stages"]
    assert {o["path"] for o in lock["finetune"]["outs"]} >= {"models/model.keras"}  # DVC recorded the stage
    run_id = started["info"]["run_id"]
    spooled = list((root / "mlruns" / "spool").glob(f"finetune-{run_id}"))
    assert spooled and "finetune-" not in run(["git", "status", "--porcelain", "--ignored=no"], root, env).stdout
    assert "spool" not in (root / "dvc.yaml").read_text()

    time.sleep(float(SHORT_RETRIES["MLFLOW_HTTP_REQUEST_TIMEOUT"]))  # longer than the stage's client would wait
    team_stack["cli"]("up")  # brings back the dead server on the same port
    client = MlflowClient(url)
    assert client.get_run(run_id).info.status == "RUNNING"  # nothing of the stage's end reached the server
    synced = run([sys.executable, "-m", "xfer", "sync"], root, env)
    assert "replayed" in synced.stdout and run_id[:8] in synced.stdout, synced.stdout
    assert not spooled[0].exists()
    got = client.get_run(run_id)
    record = yaml.safe_load((root / "reports" / "runs" / "finetune.json").read_text())
    assert got.info.status == "FINISHED" and got.data.tags["mlflow.parentRunId"] == record["parent_run_id"]
    histories = {k: client.get_metric_history(run_id, k) for k in ("loss", "val_loss", "accuracy", "epoch_seconds")}
    assert {k: sorted(m.step for m in h) for k, h in histories.items()} == {k: list(range(EPOCHS)) for k in histories}
    assert {"stopped_epoch", "mean_epoch_seconds", "transplant_max_abs_diff"} <= set(got.data.metrics)
    assert {"strategy_used", "precision_used", "finetune.epochs"} <= set(got.data.params)
    assert [a.path for a in client.list_artifacts(run_id, "keras_model")] == ["keras_model/model.keras"]
    parent = client.get_run(record["parent_run_id"])
    assert parent.info.status == "FINISHED" and parent.data.tags["stage.finetune"] == run_id
    again = run([sys.executable, "-m", "xfer", "sync"], root, env)  # a second replay adds nothing
    assert "nothing to replay" in again.stdout
    assert {k: len(client.get_metric_history(run_id, k)) for k in histories} == {k: EPOCHS for k in histories}

"""The local team stack (``xfer stack``): PostgreSQL + SeaweedFS + MLflow on free 127.0.0.1 ports."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from xfer.stack import control as xstack
from xfer.stack import services as svc

pytestmark = pytest.mark.stack
REPO = Path(__file__).resolve().parents[1]
SEARCH = "/api/2.0/mlflow/experiments/search?max_results=5"


def cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "xfer", "stack", *args], capture_output=True, text=True, env=env,
                          cwd=REPO, timeout=600)


def ok(env: dict[str, str], *args: str) -> str:
    out = cli(env, *args)
    assert out.returncode == 0, out.stderr
    return out.stdout


@pytest.fixture(scope="module")
def stack(team_stack):
    """The session's team stack (tests/conftest.py), already up when the e2e team test ran first; this module
    stops it at the end."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
        for var in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
            mp.delenv(var, raising=False)
        yield team_stack


def creds(folder: Path) -> dict[str, str]:
    return dict(line.split("=", 1) for line in (folder / "credentials").read_text().splitlines())


def bucket_keys(stack: dict, prefix: str = "mlflow/") -> list[str]:
    c = creds(stack["dir"])
    s3 = svc.s3_client(f"http://127.0.0.1:{stack['ports']['s3']}", c["XFER_STACK_S3_ACCESS_KEY"],
                       c["XFER_STACK_S3_SECRET_KEY"])
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket="xfer", Prefix=prefix)
    return [o["Key"] for page in pages for o in page.get("Contents", [])]


def run_ids_in_postgres(stack: dict) -> list[str]:
    import psycopg2

    with psycopg2.connect(host="127.0.0.1", port=stack["ports"]["postgres"], user="mlflow", dbname="mlflow",
                          password=creds(stack["dir"])["XFER_STACK_DB_PASSWORD"]) as conn, conn.cursor() as cur:
        cur.execute("SELECT run_uuid FROM runs")
        return [row[0] for row in cur.fetchall()]


def listening(folder: Path) -> list[tuple[str, int]]:
    """(ip, port) of every listening TCP socket of the stack's processes and their children."""
    pids = [p for p in xstack.Stack.load(folder).running().values() if p]
    procs = [psutil.Process(p) for p in pids]
    procs += [c for p in procs for c in p.children(recursive=True)]
    return [(c.laddr.ip, c.laddr.port) for p in procs for c in p.net_connections(kind="inet")
            if c.status == psutil.CONN_LISTEN]


def test_up_logs_a_run_into_postgres_and_the_bucket(stack, tmp_path):
    out = ok(stack["env"], "up")
    assert f"export MLFLOW_TRACKING_URI={stack['url']}" in out
    assert f"dvc remote modify --local stack endpointurl http://127.0.0.1:{stack['ports']['s3']}" in out
    assert ok(stack["env"], "status").count(" up") == 3
    env_out = ok(stack["env"], "env").splitlines()
    assert env_out and all(line.startswith("export ") for line in env_out)
    sockets = listening(stack["dir"])
    assert {p for _, p in sockets} >= set(stack["ports"].values())
    assert {ip for ip, _ in sockets} == {"127.0.0.1"}, sockets

    from mlflow import MlflowClient

    client = MlflowClient(stack["url"])
    run = client.create_run(client.create_experiment("stack-test"))
    client.log_metric(run.info.run_id, "accuracy", 0.93)
    (tmp_path / "note.txt").write_text("hello")
    client.log_artifact(run.info.run_id, str(tmp_path / "note.txt"))
    client.set_terminated(run.info.run_id)
    stack["run_id"] = run.info.run_id
    assert run.info.run_id in run_ids_in_postgres(stack)
    assert any(k.endswith(f"{run.info.run_id}/artifacts/note.txt") for k in bucket_keys(stack))


def test_search_workers_share_one_study_in_the_stacks_postgres(stack, tmp_path):
    """`xfer stack env` gives `xfer search` the stack's PostgreSQL (database optuna): two workers started together
    fill one study there, its trials nested under one parent run on the stack's tracking server."""
    import mlflow
    import optuna

    from tests.conftest import tiny_project
    from tests.test_search import two_workers

    storage = stack["client_env"]["XFER_SEARCH_STORAGE"]
    assert storage.startswith("postgresql+psycopg2://mlflow:")
    assert storage.endswith(f"@127.0.0.1:{stack['ports']['postgres']}/optuna")
    with tiny_project(tmp_path / "proj", ["download", "split", "featurize"], "search-stack") as (root, _):
        env = {**{k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}, **stack["client_env"],
               "PYTHONPATH": str(root), "MLFLOW_DISABLE_TELEMETRY": "true"}
        two_workers(root, env)
        assert not (root / "mlruns" / "optuna.db").exists()
        assert creds(stack["dir"])["XFER_STACK_DB_PASSWORD"] not in (root / "reports/search/shared.json").read_text()
    assert len(optuna.load_study(study_name="shared", storage=storage).trials) == 4
    client = mlflow.MlflowClient(stack["url"])
    exp = client.get_experiment_by_name("synthetic").experiment_id
    (parent,) = client.search_runs([exp], "tags.role = 'search'")
    trials = client.search_runs([exp], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert sorted(int(r.data.tags["trial"]) for r in trials) == [0, 1, 2, 3]


def compare_error(env: dict[str, str], tmp_path: Path) -> str:
    """What `xfer compare` (which checks the server as every stage does) says, in one line."""
    proc = subprocess.run([sys.executable, "-m", "xfer", "compare", "--out", str(tmp_path)], capture_output=True,
                          text=True, env=env, cwd=REPO, timeout=300)
    assert proc.returncode == 2 and proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1, proc.stderr
    return proc.stderr


def test_a_server_whose_bucket_is_missing_is_a_one_line_error(stack, tmp_path):
    """An MLflow server proxying artifacts to a bucket nobody created (on the stack's S3): one line, before a
    stage has trained anything."""
    port = svc.free_ports(1)[0]
    env = {**stack["env"], **stack["client_env"]}
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri",
                               f"sqlite:///{tmp_path}/m.db", "--artifacts-destination", "s3://no-such-bucket/mlflow",
                               "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                              env={**env, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}, cwd=tmp_path,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"
        svc.wait_until(lambda: svc.http_status(url + SEARCH) == 200, "mlflow", server.pid, tmp_path / "none", 120)
        err = compare_error({**env, "MLFLOW_TRACKING_URI": url}, tmp_path)
        assert "cannot use its artifact store" in err and "create the bucket" in err, err
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=60)


def test_data_persists_and_basic_auth_guards_the_api(stack, monkeypatch, tmp_path):
    run_id = stack.get("run_id") or pytest.skip("needs the first test's run")
    assert ok(stack["env"], "down").startswith("stopped")
    assert ok(stack["env"], "status").count(" down") == 3
    assert "export MLFLOW_TRACKING_USERNAME=admin" in ok(stack["env"], "up", "--auth")
    assert svc.http_status(stack["url"] + SEARCH) == 401
    admin = ("admin", creds(stack["dir"])["XFER_STACK_ADMIN_PASSWORD"])
    assert svc.http_status(stack["url"] + SEARCH, admin) == 200
    assert svc.http_status(stack["url"] + SEARCH, ("admin", "wrong")) == 401

    from mlflow import MlflowClient

    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", admin[0])
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", admin[1])
    assert MlflowClient(stack["url"]).get_run(run_id).data.metrics == {"accuracy": 0.93}
    assert any(k.endswith(f"{run_id}/artifacts/note.txt") for k in bucket_keys(stack))
    # A stage without the credentials, or with wrong ones, says what to set in one line.
    env = {**stack["env"], "MLFLOW_TRACKING_URI": stack["url"]}
    assert "credentials are needed (HTTP 401)" in compare_error(env, tmp_path)
    env.update(MLFLOW_TRACKING_USERNAME="admin", MLFLOW_TRACKING_PASSWORD="wrong")
    assert "credentials were refused (HTTP 401); set MLFLOW_TRACKING_USERNAME" in compare_error(env, tmp_path)


def test_up_brings_back_a_server_whose_main_process_was_killed(stack, monkeypatch):
    """SIGKILL of `mlflow server` leaves its uvicorn processes holding the port; `up` stops them and starts only
    the dead service, on the same port, with the runs intact; the other services keep their pids."""
    import signal
    import time

    run_id = stack.get("run_id") or pytest.skip("needs the first test's run")
    before = xstack.Stack.load(stack["dir"])
    pid, started = before.procs["mlflow"]
    others = {s: before.running()[s] for s in ("postgres", "s3")}
    os.kill(int(pid), signal.SIGKILL)
    deadline = time.monotonic() + 30
    while svc.alive(int(pid)) and time.monotonic() < deadline:
        time.sleep(0.1)
    orphans = svc.group_members(int(pid), started)
    assert orphans and svc.port_busy(stack["ports"]["mlflow"]), "the killed server left no workers on its port"
    status = ok(stack["env"], "status").splitlines()
    assert status[2].startswith("mlflow") and status[2].endswith(" down") and "".join(status).count(" down") == 1
    ok(stack["env"], "up", "--auth")
    after = xstack.Stack.load(stack["dir"])
    assert after.ports["mlflow"] == stack["ports"]["mlflow"] and after.running()["mlflow"] not in (None, int(pid))
    assert {s: after.running()[s] for s in others} == others
    assert not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in orphans)
    from mlflow import MlflowClient

    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "admin")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", creds(stack["dir"])["XFER_STACK_ADMIN_PASSWORD"])
    assert MlflowClient(stack["url"]).get_run(run_id).data.metrics == {"accuracy": 0.93}
    # The same orphans again, but this time `down` must stop them (not only the live services).
    pid, started = after.procs["mlflow"]
    os.kill(int(pid), signal.SIGKILL)
    orphans = svc.group_members(int(pid), started)
    ok(stack["env"], "down")
    assert not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in orphans)
    assert not svc.port_busy(stack["ports"]["mlflow"])
    ok(stack["env"], "up", "--auth")


def test_down_stops_everything(stack):
    state = xstack.Stack.load(stack["dir"])
    pids = [p for p in state.running().values() if p]
    ok(stack["env"], "down")
    assert ok(stack["env"], "status").count(" down") == 3
    assert not any(svc.alive(p) for p in pids)
    assert not any(svc.port_busy(p) for p in stack["ports"].values())
    assert "nothing running" in ok(stack["env"], "down")


def one_line_error(capsys, *argv: str) -> str:
    assert xstack.main(list(argv)) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err


def test_a_busy_port_is_a_one_line_error(tmp_path, capsys):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        err = one_line_error(capsys, "up", "--dir", str(tmp_path / "s"), "--postgres-port", str(port))
    assert f"port {port} for postgres is already in use" in err


def test_missing_postgres_is_a_one_line_error(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("XFER_STACK_PG_BINDIR", str(tmp_path))
    pg, s3, ml = svc.free_ports(3)
    err = one_line_error(capsys, "up", "--dir", str(tmp_path / "s"), "--postgres-port", str(pg), "--s3-port", str(s3),
                         "--mlflow-port", str(ml))
    assert "apt-get install -y postgresql" in err


@pytest.mark.skipif(os.geteuid() != 0, reason="only root runs PostgreSQL as the postgres system user")
def test_root_needs_a_stack_dir_the_postgres_user_can_enter(tmp_path, capsys):
    pg, s3, ml = svc.free_ports(3)
    err = one_line_error(capsys, "up", "--dir", str(tmp_path / "s"), "--postgres-port", str(pg), "--s3-port", str(s3),
                         "--mlflow-port", str(ml))
    assert "'postgres' system user" in err and "cannot enter" in err

"""End to end: the offline demo through DVC in a fresh git repository: a SIGKILLed and forced rerun change no
output byte, a head edit reruns exactly the stages below it, and two queued experiments run in parallel; a
second repository reproduces the first one's outputs."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml

from tests.conftest import REPO, copy_project

pytestmark = pytest.mark.e2e


def run(cmd: list[str], cwd: Path, env: dict) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout + proc.stderr


def fresh_repo(tmp_path_factory) -> tuple[Path, dict, list[str]]:
    """A copy of the project as a new git repository with DVC; the environment and dvc command to drive it."""
    root = copy_project(tmp_path_factory.mktemp("e2e") / "repo")
    for name in (".gitignore", ".dvcignore"):
        shutil.copy2(REPO / name, root / name)
    (root / ".dvc").mkdir()
    shutil.copy2(REPO / ".dvc" / "config", root / ".dvc" / "config")
    (root / "mlruns").mkdir()
    shutil.copy2(REPO / "mlruns" / ".gitignore", root / "mlruns" / ".gitignore")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_", "XFER_"))}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["DVC_NO_ANALYTICS"] = "1"
    git = ["git", "-c", "user.name=test", "-c", "user.email=test@example.com"]
    run(["git", "init", "-q"], root, env)
    run([*git, "add", "-A"], root, env)
    run([*git, "commit", "-qm", "project"], root, env)
    return root, env, [sys.executable, "-m", "dvc"]


@pytest.fixture(scope="module")
def demo_repo(tmp_path_factory):
    root, env, dvc = fresh_repo(tmp_path_factory)
    demo_log = run([*dvc, "exp", "run", "-S", "experiment=demo"], root, env)
    first = {"lock": (root / "dvc.lock").read_text(),
             "metrics": json.loads((root / "reports/metrics/evaluate.json").read_text())}
    return root, env, dvc, demo_log, first


def output_hashes(lock_text: str, stages=None) -> dict[tuple[str, str], str]:
    """md5 of every cached output (not the uncached reports/) per stage, from a dvc.lock text."""
    lock = yaml.safe_load(lock_text)["stages"]
    return {(stage, out["path"]): out["md5"] for stage, entry in lock.items() if stages is None or stage in stages
            for out in entry.get("outs", []) if not out["path"].startswith("reports/")}


def dvc_status_clean(root: Path, env: dict, dvc: list[str]) -> bool:
    return "Data and pipelines are up to date" in run([*dvc, "status"], root, env)


def mlflow_runs(root: Path):
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{root}/mlruns/mlflow.db")
    exp = client.get_experiment_by_name("synthetic")
    return client, exp, client.search_runs([exp.experiment_id], order_by=["attributes.start_time ASC"])


def test_demo_reaches_the_accuracy_threshold(demo_repo):
    root, *_ = demo_repo
    metrics = json.loads((root / "reports/metrics/evaluate.json").read_text())
    assert metrics["test_accuracy"] > 0.9
    assert (root / "models/model.keras").is_file() and (root / "dvc.lock").is_file()


def test_one_mlflow_run_per_stage_sharing_the_pipeline_tag(demo_repo):
    root, *_ = demo_repo
    client, exp, runs = mlflow_runs(root)
    names = [r.info.run_name for r in runs]
    assert names == [f"{s}-vgg16" for s in ("download", "split", "featurize", "views", "trunk", "train_head",
                                            "finetune", "evaluate")]
    pipeline = {r.data.tags["pipeline_id"] for r in runs}
    assert len(pipeline) == 1 and not pipeline.pop().startswith("manual-")  # derived from the dvc process
    assert all(r.data.tags["dvc_exp_name"] for r in runs)
    assert exp.artifact_location == (root / "mlruns" / "artifacts").as_uri()
    assert client.list_artifacts(runs[-2].info.run_id, "model")  # finetune logged its model


def test_killed_and_forced_reruns_change_no_byte_and_rerun_nothing_below(demo_repo):
    """featurize SIGKILLed under `dvc repro`, then `dvc repro`: same feature bytes, nothing below reruns, the
    orphaned MLflow run is closed; `dvc repro -f -s train_head`: same head.keras bytes; `dvc status` clean."""
    root, env, dvc, _, first = demo_repo
    before = output_hashes((root / "dvc.lock").read_text())
    assert len(before) >= 5 and dvc_status_clean(root, env, dvc)
    repro = subprocess.Popen([*dvc, "repro", "-f", "-s", "featurize"], cwd=root, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    while not list((root / "data/features").glob(".vgg16.tmp*/train_features.npy")):
        assert repro.poll() is None and time.time() < deadline, "featurize did not start"
        time.sleep(0.05)
    stage = [p for p in psutil.Process(repro.pid).children(recursive=True) if "stages.featurize" in p.cmdline()]
    assert stage, "featurize process not found"
    stage[0].send_signal(signal.SIGKILL)
    repro.communicate(timeout=120)
    assert repro.returncode != 0
    log = run([*dvc, "repro"], root, env)
    assert re.findall(r"Running stage '(\w+)'", log) == ["featurize"]
    assert output_hashes((root / "dvc.lock").read_text()) == before and dvc_status_clean(root, env, dvc)
    assert not list((root / "data/features").glob(".*tmp*"))
    _, _, runs = mlflow_runs(root)
    killed = [r for r in runs if r.info.run_name == "featurize-vgg16" and r.info.status == "KILLED"]
    assert len(killed) == 1 and "xfer.closed_because" in killed[0].data.tags
    log = run([*dvc, "repro", "-f", "-s", "train_head"], root, env)
    assert re.findall(r"Running stage '(\w+)'", log) == ["train_head"]
    assert output_hashes((root / "dvc.lock").read_text()) == before and dvc_status_clean(root, env, dvc)


def test_head_edit_reruns_exactly_the_downstream_stages(demo_repo):
    root, env, dvc, *_ = demo_repo
    params = root / "params.yaml"
    params.write_text(params.read_text().replace("units: 256", "units: 128"))
    log = run([*dvc, "repro"], root, env)
    ran = re.findall(r"Running stage '(\w+)'", log)
    assert ran == ["train_head", "finetune", "evaluate"]
    for stage in ("download", "split", "featurize"):
        assert f"Stage '{stage}' didn't change, skipping" in log
    _, _, runs = mlflow_runs(root)
    latest = [r for r in runs if r.data.tags["pipeline_id"] == runs[-1].data.tags["pipeline_id"]]
    assert [r.info.run_name for r in latest] == ["train_head-vgg16", "finetune-vgg16", "evaluate-vgg16"]
    assert latest[0].data.params["head.units"] == "128"


@pytest.fixture(scope="module")
def queue_repo(tmp_path_factory):
    """A second fresh repository: two demo experiments queued and run by two parallel workers."""
    root, env, dvc = fresh_repo(tmp_path_factory)
    run([*dvc, "exp", "run", "--queue", "-n", "demo-a", "-S", "experiment=demo"], root, env)
    run([*dvc, "exp", "run", "--queue", "-n", "demo-b", "-S", "experiment=demo", "-S", "head.units=64"], root, env)
    start = time.time()
    run([*dvc, "queue", "start", "-j", "2"], root, env)
    while True:
        status = run([*dvc, "queue", "status"], root, env)
        if not re.search(r"\b(Running|Queued)\b", status):
            break
        assert time.time() - start < 1500, status
        time.sleep(5)
    return root, env, dvc, status, time.time() - start


def exp_file(root: Path, env: dict, name: str, path: str) -> str:
    refs = run(["git", "for-each-ref", "--format=%(refname)", "refs/exps"], root, env).split()
    ref = next(r for r in refs if r.endswith(f"/{name}"))
    return run(["git", "show", f"{ref}:{path}"], root, env)


def test_parallel_queued_experiments_lose_nothing(queue_repo):
    root, env, dvc, status, _ = queue_repo
    assert "Failed" not in status, status
    names = run([*dvc, "exp", "list", "--name-only"], root, env).split()
    assert {"demo-a", "demo-b"} <= set(names)
    _, _, runs = mlflow_runs(root)
    assert len(runs) == 16 and all(r.info.status == "FINISHED" for r in runs)
    by_exp = {name: sorted(r.info.run_name for r in runs if r.data.tags["dvc_exp_name"] == name)
              for name in ("demo-a", "demo-b")}
    stages = sorted(f"{s}-vgg16" for s in ("download", "split", "featurize", "views", "trunk", "train_head", "finetune",
                                           "evaluate"))
    assert by_exp == {"demo-a": stages, "demo-b": stages}


def test_same_parameters_give_the_same_bytes_in_another_repository(demo_repo, queue_repo):
    """demo-a (queued, run beside demo-b) and the first repository's demo: same params, same output hashes for
    split, featurize and train_head, same final metrics to 4 decimals."""
    *_, first = demo_repo
    root, env, *_ = queue_repo
    stages = ("split", "featurize", "train_head")
    assert output_hashes(exp_file(root, env, "demo-a", "dvc.lock"), stages) == output_hashes(first["lock"], stages)
    metrics = json.loads(exp_file(root, env, "demo-a", "reports/metrics/evaluate.json"))
    for key in ("test_accuracy", "test_loss", "test_auc", "test_ece", "head_test_accuracy"):
        assert round(metrics[key], 4) == round(first["metrics"][key], 4), key

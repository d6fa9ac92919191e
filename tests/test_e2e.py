"""End to end: the offline demo through DVC in a fresh git repository: a SIGKILLed and forced rerun change no
output byte, a head edit reruns exactly the stages below it, and two queued experiments run in parallel; a
second repository reproduces the first one's outputs."""

from __future__ import annotations

import json
import os
import re
import shlex
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
GIT = ["git", "-c", "user.name=test", "-c", "user.email=test@example.com"]


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
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("MLFLOW_", "DVC_", "XFER_")) or k.startswith("XFER_WARM")}  # the suite's warm dir
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["DVC_NO_ANALYTICS"] = "1"
    run(["git", "init", "-q", "-b", "main"], root, env)
    run([*GIT, "add", "-A"], root, env)
    run([*GIT, "commit", "-qm", "project"], root, env)
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


def mlflow_runs(root: Path, role: str = "stage", env: dict | None = None):
    """The stage runs (or, with role="pipeline", the parent runs) of the demo experiment, oldest first, from the
    tracking server in ``env`` or else the repository's own database."""
    import mlflow

    client = mlflow.MlflowClient((env or {}).get("MLFLOW_TRACKING_URI") or f"sqlite:///{root}/mlruns/mlflow.db")
    exp = client.get_experiment_by_name("synthetic")
    return client, exp, client.search_runs([exp.experiment_id], f"tags.role = '{role}'",
                                           order_by=["attributes.start_time ASC"])


def test_demo_reaches_the_accuracy_threshold(demo_repo):
    root, *_ = demo_repo
    metrics = json.loads((root / "reports/metrics/evaluate.json").read_text())
    assert metrics["test_accuracy"] > 0.9
    assert (root / "models/model.keras").is_file() and (root / "dvc.lock").is_file()


def test_every_stage_of_the_demo_starts_quietly(demo_repo):
    """No TensorFlow/absl/CUDA start-up line in any stage's output, trunk and views included."""
    _, _, _, demo_log, _ = demo_repo
    ran = re.findall(r"Running stage '(\w+)'", demo_log)
    assert {"download", "split", "featurize", "views", "trunk", "train_head", "finetune", "evaluate"} <= set(ran)
    for noise in ("absl", "cuda", "oneDNN", "cpu_feature_guard", "rebuild TensorFlow"):
        assert noise not in demo_log, f"{noise!r} in the log:\n{demo_log}"


def test_one_parent_run_per_pipeline_with_its_stage_runs_nested(demo_repo):
    root, *_ = demo_repo
    client, exp, runs = mlflow_runs(root)
    names = [r.info.run_name for r in runs]
    assert names == ["download", "split", *(f"{s}-vgg16" for s in ("featurize", "audit", "views", "trunk",
                                                                     "train_head", "finetune", "evaluate", "export"))]
    pipeline = {r.data.tags["pipeline_id"] for r in runs}
    assert len(pipeline) == 1 and re.fullmatch(r"[0-9a-f]{8}", pipeline.pop())  # derived from the dvc process
    _, _, (parent,) = mlflow_runs(root, "pipeline")
    assert parent.info.status == "FINISHED" and parent.info.run_name == parent.data.tags["dvc_exp_name"] != ""
    assert all(r.data.tags["mlflow.parentRunId"] == parent.info.run_id for r in runs)
    assert parent.data.metrics["test_accuracy"] > 0.9 and parent.data.tags["cached_stages"] == "none"
    assert exp.artifact_location == (root / "mlruns" / "artifacts").as_uri()
    assert client.list_artifacts(runs[-3].info.run_id, "keras_model")  # finetune logged its model
    assert client.list_artifacts(runs[-1].info.run_id, "export")  # export logged the deployable files


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
    _, _, parents = mlflow_runs(root, "pipeline")  # the SIGKILLed pipeline's parent was closed too
    assert [p.info.status for p in parents] == ["FINISHED", "KILLED", "FINISHED"]
    log = run([*dvc, "repro", "-f", "-s", "train_head"], root, env)
    assert re.findall(r"Running stage '(\w+)'", log) == ["train_head"]
    assert output_hashes((root / "dvc.lock").read_text()) == before and dvc_status_clean(root, env, dvc)


def test_head_edit_reruns_exactly_the_downstream_stages(demo_repo):
    root, env, dvc, *_ = demo_repo
    params = root / "params.yaml"
    params.write_text(params.read_text().replace("units: 256", "units: 128"))
    log = run([*dvc, "repro"], root, env)
    ran = re.findall(r"Running stage '(\w+)'", log)
    assert ran == ["train_head", "finetune", "evaluate", "export"]
    for stage in ("download", "split", "featurize"):
        assert f"Stage '{stage}' didn't change, skipping" in log
    # What a user sees: per stage one progress bar and one summary line; no Keras epoch lines, no TensorFlow,
    # MLflow or registry chatter.
    for stage in ran:
        assert len(re.findall(rf"^{stage}: {{", log, re.M)) == 1, log
    assert "train_head: 100%" in log and "finetune: 100%" in log
    for noise in ("absl", "cuda", "Warning", "WARNING", "INFO", "Successfully registered", "Created version",
                  "Epoch 1/", "Downloading artifacts"):
        assert noise not in log, f"{noise!r} in the log:\n{log}"
    _, _, runs = mlflow_runs(root)
    latest = [r for r in runs if r.data.tags["pipeline_id"] == runs[-1].data.tags["pipeline_id"]]
    assert [r.info.run_name for r in latest] == ["train_head-vgg16", "finetune-vgg16", "evaluate-vgg16",
                                                 "export-vgg16"]
    assert latest[0].data.params["head.units"] == "128"
    # Its parent still summarizes the cached stages, linked to the runs that produced them.
    _, _, parents = mlflow_runs(root, "pipeline")
    t, m = parents[-1].data.tags, parents[-1].data.metrics
    assert t["cached_stages"] == "download,split,featurize,audit,views,trunk"  # the audit is not below the head
    assert t["ran_stages"] == "train_head,finetune,evaluate,export"
    assert parents[-1].data.params["head.units"] == "128"
    assert {"images_kept", "featurize_images_per_sec", "featurize_seconds", "test_accuracy",
            "audit_label_issues", "audit_near_duplicate_pairs"} <= set(m)
    assert t["stage.split"] == parents[0].data.tags["stage.split"]  # linked to the run that produced it


def test_an_edited_photo_marks_every_stage_that_reads_images_through_the_split(demo_repo):
    """Only split depends on data/raw itself; an edited photo changes its manifest (the sha256 column), which the
    stages reading images depend on. Restored, the split's bytes come back and nothing is left to run."""
    from PIL import Image

    root, env, dvc, *_ = demo_repo
    photo = sorted((root / "data/raw/images").rglob("*.jpg"))[0]
    original = photo.read_bytes()
    with Image.open(photo) as image:
        image.save(photo.with_suffix(".tmp"), "JPEG", quality=60)
    photo.with_suffix(".tmp").replace(photo)
    try:
        run([*dvc, "repro", "-s", "split"], root, env)
        status = json.loads(run([*dvc, "status", "--json"], root, env).strip() or "{}")
        changed = {name for name, entries in status.items()
                   if any(e.get("changed deps", {}).get("data/splits") == "modified" for e in entries
                          if isinstance(e, dict))}
        assert changed == {"featurize", "audit", "views", "trunk", "finetune", "evaluate", "scratch", "export"}
    finally:
        photo.write_bytes(original)
        run([*dvc, "repro", "-s", "split"], root, env)
    assert dvc_status_clean(root, env, dvc)


@pytest.fixture(scope="module")
def queue_repo(tmp_path_factory, team_stack):
    """A second fresh repository, as a team member's clone: its git remote `origin` (a bare repository), its DVC
    remote in the team stack's bucket, MLFLOW_TRACKING_URI on the stack's server. Two demo experiments (VGG16;
    MobileNetV2 with the from-scratch convnet baseline) queued and run by two parallel workers."""
    root, env, dvc = fresh_repo(tmp_path_factory)
    env.update(team_stack["client_env"])  # what `eval "$(xfer stack env)"` sets
    origin = root.parent / "origin.git"
    run(["git", "init", "-q", "--bare", "-b", "main", str(origin)], root, env)
    run(["git", "remote", "add", "origin", str(origin)], root, env)
    run(["git", "push", "-q", "origin", "HEAD:main"], root, env)
    for cmd in team_stack["dvc_remote"]:  # `dvc remote add --local -d ...`, `dvc remote modify ... endpointurl`
        run([*dvc, *cmd], root, env)
    run([*dvc, "exp", "run", "--queue", "-n", "demo-a", "-S", "experiment=demo"], root, env)
    run([*dvc, "exp", "run", "--queue", "-n", "demo-b", "-S", "experiment=demo", "-S", "backbone=mobilenetv2", "-S",
         "scratch=convnet", "-S", "scratch.epochs=1"], root, env)
    start = time.time()
    run([*dvc, "queue", "start", "-j", "2"], root, env)
    while True:
        status = run([*dvc, "queue", "status"], root, env)
        if not re.search(r"\b(Running|Queued)\b", status):
            break
        assert time.time() - start < 1500, status
        time.sleep(2)
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
    client, _, runs = mlflow_runs(root, env=env)
    _, _, parents = mlflow_runs(root, "pipeline", env)
    stages = ("featurize", "audit", "views", "trunk", "train_head", "finetune", "evaluate", "export")
    found = {name: sorted(r.info.run_name for r in runs if r.data.tags["dvc_exp_name"] == name)
             for name in ("demo-a", "demo-b")}
    expected = {name: sorted(["download", "split", *(f"{s}-{b}" for s in stages), *extra])
                for name, b, extra in (("demo-a", "vgg16", []), ("demo-b", "mobilenetv2", ["scratch-convnet"]))}
    why = "\n".join([f"{status}", *(f"{r.info.run_name} {r.info.status} {r.data.tags.get('dvc_exp_name')} "
                                      f"{r.data.tags.get('pipeline_id')}" for r in runs),
                      *(f"parent {p.info.run_name} {p.info.status} {p.data.tags}" for p in parents)])
    assert found == expected and all(r.info.status == "FINISHED" for r in runs), why
    assert sorted(p.info.run_name for p in parents) == ["demo-a", "demo-b"], why
    assert all(p.info.status == "FINISHED" and "test_accuracy" in p.data.metrics for p in parents), why
    for p in parents:  # each parent links exactly its own experiment's stage runs
        links = {v for k, v in p.data.tags.items() if k.startswith("stage.")}
        assert links == {r.info.run_id for r in runs if r.data.tags["dvc_exp_name"] == p.info.run_name}, why


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


CHROMIUM = Path("/usr/bin/chromium")  # Debian's package; Playwright's own browser download cannot work offline
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-sync",
                  "--disable-background-networking", "--disable-component-update"]


def check_mlflow_ui(url: str, shots: Path) -> None:
    """The leaderboard view in headless Chromium: both parent rows with their test accuracy, one expanded to its
    nested stage runs; then a parent's page with its params and metrics. Saves the screenshots."""
    import mlflow
    from playwright.sync_api import sync_playwright

    from xfer.track.summary import view_url

    assert CHROMIUM.exists(), f"{CHROMIUM} not found: install Debian's chromium package (README, Setup)"
    client = mlflow.MlflowClient(url)
    exp = client.get_experiment_by_name("synthetic")
    parents = client.search_runs([exp.experiment_id], "tags.role = 'pipeline'")
    assert len({p.data.params["backbone.name"] for p in parents}) == 2
    shots.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_FLAGS)
        page = browser.new_page(viewport={"width": 1700, "height": 760})
        page.goto(view_url(exp.experiment_id, url))
        for parent in parents:
            page.get_by_text(parent.info.run_name, exact=True).first.wait_for(timeout=60_000)
        for label in ("Close", "Hide banner", "Toggle sidebar"):  # the assistant panel, the shared-view banner
            button = page.get_by_role("button", name=label, exact=True)
            if button.count():
                button.first.click()

        def row_cells(name: str) -> list[str]:
            """The cells of a run's row (ag-grid splits a row into pinned and scrolling parts)."""
            index = page.get_by_role("row").filter(has_text=name).first.get_attribute("row-index")
            parts = page.locator(f"[role=row][row-index='{index}']")
            return [cell for i in range(parts.count()) for cell in parts.nth(i).inner_text().split("\n")]

        for parent in parents:  # one row each, with its test accuracy as the table rounds it (to 2-6 decimals)
            value = parent.data.metrics["test_accuracy"]
            shown = {f"{value:.{d}f}".rstrip("0").rstrip(".") for d in range(2, 7)}
            cells = row_cells(parent.info.run_name)
            assert shown & set(cells), (value, cells)
        first = parents[0]
        row = page.get_by_role("row").filter(has_text=first.info.run_name).first
        row.get_by_role("button").first.click()  # the expander: its stage runs appear nested below it
        backbone = first.data.params["backbone.name"]
        for stage in ("featurize", "train_head", "finetune", "evaluate"):
            page.get_by_text(f"{stage}-{backbone}", exact=True).first.wait_for(timeout=30_000)
        page.screenshot(path=str(shots / "mlflow-runs.png"))
        page.goto(f"{url}/#/experiments/{exp.experiment_id}/runs/{first.info.run_id}")
        page.get_by_text("backbone.name", exact=True).first.wait_for(timeout=60_000)
        text = page.inner_text("body")
        for name in ("test_accuracy", "head_val_accuracy", "pipeline_seconds", "weights_sha256", "split.train"):
            assert name in text, name
        page.screenshot(path=str(shots / "mlflow-parent.png"), full_page=True)
        browser.close()


@pytest.mark.browser
def test_mlflow_ui_shows_one_row_per_pipeline_in_a_real_browser(queue_repo, tmp_path):
    """The team stack's `mlflow server` (127.0.0.1), where the queued experiments logged, opened in headless
    Chromium. XFER_SCREENSHOTS=docs keeps the screenshots the README shows."""
    root, env, *_ = queue_repo
    check_mlflow_ui(env["MLFLOW_TRACKING_URI"], Path(os.environ.get("XFER_SCREENSHOTS") or tmp_path))


def test_the_readme_dvc_exp_show_view_fits_120_columns(queue_repo):
    """The compact `dvc exp show` command of the README: every column shown in full at 120 columns."""
    root, env, dvc, *_ = queue_repo
    line = next(x for x in (REPO / "README.md").read_text().splitlines() if x.startswith("dvc exp show --drop"))
    args = shlex.split(line.split(" #")[0])[1:]
    out = run([*dvc, *args, "--no-pager"], root, {**env, "COLUMNS": "120"})
    lines = [x.rstrip() for x in out.splitlines() if x.strip()]
    assert "…" not in out and max(len(x) for x in lines) <= 120, out
    header = lines[1].split()
    assert header == ["Experiment", "head_test_accuracy", "test_accuracy", "test_auc", "backbone.name", "head.name",
                      "seed"], out
    rows = {x.split("[")[1].split("]")[0]: x.split("]")[1].split() for x in lines if "[demo-" in x}
    assert rows["demo-a"][3] == "vgg16" and rows["demo-b"][3] == "mobilenetv2"
    metrics = json.loads(exp_file(root, env, "demo-a", "reports/metrics/evaluate.json"))
    assert float(rows["demo-a"][1]) == pytest.approx(metrics["test_accuracy"], abs=1e-4)


def test_the_scratch_baseline_sits_beside_the_transfer_models(queue_repo):
    """(Last: it applies demo-b to the workspace.) `-S scratch=convnet` trained the book's convnet on the same split:
    the leaderboard lists it beside each backbone's head and fine-tuned model, `dvc exp show` has its metric and
    `dvc plots` its training curves."""
    root, env, dvc, *_ = queue_repo
    out = run([sys.executable, "-m", "xfer", "compare", "--per-run", "--experiment", "synthetic"], root, env)
    board = (root / "reports/compare/leaderboard.csv").read_text()
    models = {line.split(",")[0] for line in board.splitlines()[1:]}
    assert models == {"vgg16/head", "vgg16/finetuned", "mobilenetv2/head", "mobilenetv2/finetuned",
                      "scratch/convnet"}, out
    shown = json.loads(run([*dvc, "exp", "show", "--json", "--no-pager"], root, env))
    exps = {e["name"]: e for commit in shown for e in commit.get("experiments") or [] if e.get("name")}
    metrics = {name: e["revs"][0]["data"]["metrics"] for name, e in exps.items()}
    assert metrics["demo-b"]["reports/metrics/scratch.json"]["data"]["scratch_test_accuracy"] > 0
    assert metrics["demo-a"]["reports/metrics/scratch.json"]["data"] == {}  # scratch: none
    run([*dvc, "exp", "apply", "demo-b"], root, env)
    plots = json.loads(run([*dvc, "plots", "show", "--json"], root, env))["data"]
    assert len(plots["scratch_loss"]) == 1 and plots["scratch_loss"][0]["type"] == "vega"
    assert {"reports/scratch/misclassified.png", "reports/scratch/correct.png", "reports/correct.png"} <= set(plots)


def test_a_team_shares_runs_data_models_and_experiments_through_the_stack(queue_repo, team_stack, tmp_path):
    """(After the scratch test applied demo-b.) The two parallel experiments logged to the stack's MLflow server:
    every run is in PostgreSQL, every artifact in the bucket, the model registered with its alias. The data,
    models and experiments go to the bucket with `dvc push` / `dvc exp push`; a teammate's fresh clone pulls them
    and `dvc repro` recomputes nothing."""
    import psycopg2

    from tests.test_stack import bucket_keys, creds

    root, env, dvc, *_ = queue_repo
    client, exp, runs = mlflow_runs(root, env=env)
    _, _, parents = mlflow_runs(root, "pipeline", env)
    ids = {r.info.run_id for r in [*runs, *parents]}
    with psycopg2.connect(host="127.0.0.1", port=team_stack["ports"]["postgres"], user="mlflow", dbname="mlflow",
                          password=creds(team_stack["dir"])["XFER_STACK_DB_PASSWORD"]) as db, db.cursor() as cur:
        cur.execute("SELECT run_uuid FROM runs WHERE experiment_id = %s", (int(exp.experiment_id),))
        assert {row[0] for row in cur.fetchall()} == ids
    keys = bucket_keys(team_stack)
    for run_ in [*runs, *parents]:
        for artifact in client.list_artifacts(run_.info.run_id):
            assert any(f"{run_.info.run_id}/artifacts/{artifact.path}" in k for k in keys), artifact.path
    assert not (root / "mlruns" / "mlflow.db").exists()  # nothing went to the local database
    version = client.get_model_version_by_alias("synthetic-classifier", "candidate")
    assert version.run_id in ids
    out = run([sys.executable, "-m", "xfer", "compare", "--experiment", "synthetic"], root, env)
    assert f"{team_stack['url']}/#/experiments/{exp.experiment_id}" in out  # the leaderboard read the server

    run([*dvc, "exp", "apply", "demo-b"], root, env)  # (done by the scratch test already, when it ran)
    run([*GIT, "add", "-A"], root, env)
    run([*GIT, "commit", "-qm", "demo-b"], root, env)
    run([*dvc, "push"], root, env)
    run(["git", "push", "-q", "origin", "HEAD:main"], root, env)
    run([*dvc, "exp", "push", "origin", "demo-a"], root, env)
    assert any(k.startswith("dvc/") for k in bucket_keys(team_stack, prefix="dvc/"))

    clone = tmp_path / "clone"
    run(["git", "clone", "-q", str(root.parent / "origin.git"), str(clone)], tmp_path, env)
    for cmd in team_stack["dvc_remote"]:
        run([*dvc, *cmd], clone, env)
    run([*dvc, "pull"], clone, env)
    log = run([*dvc, "repro"], clone, env)
    assert "Running stage" not in log and dvc_status_clean(clone, env, dvc), log
    assert (clone / "models/model.keras").read_bytes() == (root / "models/model.keras").read_bytes()
    run([*dvc, "exp", "pull", "origin", "demo-a"], clone, env)
    assert "demo-a" in run([*dvc, "exp", "list", "--all-commits", "--name-only"], clone, env).split()
    run([*dvc, "exp", "apply", "demo-a"], clone, env)
    assert yaml.safe_load((clone / "params.yaml").read_text())["backbone"]["name"] == "vgg16"
    assert dvc_status_clean(clone, env, dvc)  # demo-a's outputs came with `dvc exp pull`

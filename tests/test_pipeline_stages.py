"""featurize, train_head, finetune, evaluate (and a from-scratch mini-Xception) on a tiny generated data set
(random VGG16 at 32 px)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from tests.conftest import TINY, assert_features_close, tiny_project
from xfer import XferError
from xfer.core.config import load_params
from xfer.core.files import read_json

STAGES = ["download", "split", "featurize", "audit", "views", "trunk", "train_head", "finetune", "evaluate",
          "scratch"]
TRANSFER = STAGES[:-1]
# A from-scratch baseline small enough for seconds: two residual blocks at 32 px.
SCRATCH = ["scratch=xception_mini", "scratch.image_size=32", "scratch.filters=[8,16]", "scratch.epochs=2",
           "scratch.batch_size=8"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    with tiny_project(tmp_path_factory.mktemp("tiny") / "proj", STAGES, "pipeline-under-test", SCRATCH) as (root,
                                                                                                          cfg):
        yield root, cfg


def test_features_are_cached_per_split_aligned_and_pickle_free(tiny_run):
    root, _ = tiny_run
    d = root / "data/features/vgg16"
    for split, n in [("train", 24), ("val", 12), ("test", 12)]:
        x = np.load(d / f"{split}_features.npy", allow_pickle=False)
        y = np.load(d / f"{split}_labels.npy", allow_pickle=False)
        assert x.shape == (n, 1, 1, 512) and x.dtype == np.float32 and np.isfinite(x).all()
        manifest = pd.read_csv(root / f"data/splits/{split}.csv")
        assert (y == manifest["label"].to_numpy()).all()
        paths = (d / f"{split}_paths.txt").read_text().splitlines()
        assert paths == [f"data/raw/images/{p}" for p in manifest["path"]]
    meta = read_json(d / "meta.json")
    assert meta["feature_shape"] == [1, 1, 512] and meta["splits"]["train"] == {"images": 24}
    assert "per_sec" not in (d / "meta.json").read_text()  # timings stay out of the cached output
    assert read_json(root / "reports/metrics/featurize.json")["images_per_sec"] > 0
    assert (d / "base.weights.h5").is_file()
    assert not list(d.parent.glob(".*tmp*")), "temporary folders left behind"


def test_features_match_a_fresh_forward_pass(tiny_run):
    """Row i of the cache is the base model applied to image i of the manifest."""
    root, cfg = tiny_run
    import keras

    from xfer.data.images import decode_and_resize
    from xfer.nets.backbones import build_base

    base = build_base(cfg.backbone, root / "data/features/vgg16/base.weights.h5")
    paths = (root / "data/features/vgg16/val_paths.txt").read_text().splitlines()
    images = np.stack([decode_and_resize(str(root / p), 32).numpy() for p in paths[-3:]])
    expected = np.load(root / "data/features/vgg16/val_features.npy")[-3:]
    assert_features_close(base.predict(images, verbose=0), expected)  # batch of 3 vs batches of 8
    keras.backend.clear_session()


def test_head_and_finetune_outputs(tiny_run):
    root, _ = tiny_run
    head = read_json(root / "reports/metrics/head.json")
    assert set(head) == {"val_loss", "val_accuracy"}  # `dvc metrics show`: what a user compares
    curves = pd.read_csv(root / "reports/plots/head.csv")
    assert len(curves) >= 1
    assert list(curves.columns[:1]) == ["epoch"] and {"val_loss", "val_accuracy"} <= set(curves.columns)
    assert set(read_json(root / "reports/metrics/finetune.json")) == {"val_loss", "val_accuracy"}
    import mlflow

    run = mlflow.MlflowClient(f"sqlite:///{root}/mlflow.db").get_run(
        read_json(root / "reports/runs/finetune.json")["run_id"])
    assert run.data.metrics["transplant_max_abs_diff"] < 1e-3
    assert run.data.metrics["trainable_layers"] == 3  # block5_conv1..3 of VGG16
    assert (root / "models/head.keras").is_file() and (root / "models/model.keras").is_file()


def test_the_head_is_fitted_a_whole_epoch_per_call(tiny_run):
    """train_head: steps_per_execution = the batches of one epoch (the same updates, one call per epoch)."""
    import keras
    import mlflow

    root, cfg = tiny_run
    run = mlflow.MlflowClient(f"sqlite:///{root}/mlflow.db").get_run(
        read_json(root / "reports/runs/train_head.json")["run_id"])
    batches = -(-int(run.data.metrics["train_rows"]) // int(cfg.head.batch_size))
    assert batches > 1 and keras.saving.load_model(str(root / "models/head.keras")).steps_per_execution == batches


def test_evaluate_scores_the_image_model_and_the_head(tiny_run):
    root, _ = tiny_run
    m = read_json(root / "reports/metrics/evaluate.json")
    for key in ("test_accuracy", "head_test_accuracy", "test_auc", "test_ece", "test_f1_macro"):
        assert 0 <= m[key] <= 1, key
    assert all(isinstance(v, (int, float)) for v in m.values())  # `dvc metrics show`: numbers only
    full = read_json(root / "reports/evaluate.json")
    assert full["test_images"] == 12 and set(full["test_per_class"]) == {"blobs", "stripes"}
    assert full["test_image_passes"] == 2  # fine-tuned: the image model on the images and on their mirrors
    assert np.array(full["test_confusion_matrix"]).sum() == 12
    preds = pd.read_csv(root / "reports/plots/test_predictions.csv")
    assert len(preds) == 12 and set(preds["actual"]) == {"blobs", "stripes"}
    roc = pd.read_csv(root / "reports/plots/roc.csv")
    assert roc["fpr"].iloc[0] == 0 and roc["tpr"].iloc[-1] == 1
    for grid in ("misclassified", "correct"):  # test images beside their Grad-CAM heatmaps
        assert (root / f"reports/{grid}.png").read_bytes()[:4] == b"\x89PNG"


def test_registered_model_takes_raw_images(tiny_run):
    """models:/synthetic-classifier@candidate round-trips through pyfunc on file bytes and decoded arrays."""
    root, _ = tiny_run
    import mlflow
    from PIL import Image

    uri = f"sqlite:///{root}/mlflow.db"
    client = mlflow.MlflowClient(uri)
    version = client.get_model_version_by_alias("synthetic-classifier", "candidate")
    assert version.tags["backbone"] == "vgg16" and version.tags["pipeline_id"] == "pipeline-under-test"
    assert version.tags["run_id"] == read_json(root / "reports/runs/evaluate.json")["run_id"]
    accuracy = read_json(root / "reports/metrics/evaluate.json")["test_accuracy"]
    assert version.tags["test_accuracy"] == f"{accuracy:.4f}" and version.tags["split"] == "12/6/6"
    assert f"{accuracy:.4f}" in version.description and "per class train/val/test 12/6/6" in version.description
    experiment = client.get_experiment_by_name("synthetic").experiment_id
    (logged,) = client.search_logged_models([experiment], f"source_run_id = '{version.tags['run_id']}'")
    assert logged.name == "classifier" and logged.model_id in version.source
    mlflow.set_tracking_uri(uri)
    model = mlflow.pyfunc.load_model("models:/synthetic-classifier@candidate")
    assert model.metadata.signature.inputs.input_names() == ["image"]
    files = sorted((root / "data/raw/images/stripes").glob("*.jpg"))[:3]
    out = model.predict(pd.DataFrame({"image": [f.read_bytes() for f in files]}))
    assert list(out.columns) == ["class", "probability"] and len(out) == 3
    assert set(out["class"]) <= {"blobs", "stripes"} and out["probability"].between(0.5, 1).all()
    arrays = pd.DataFrame({"image": [np.asarray(Image.open(f)) for f in files]})
    pd.testing.assert_frame_equal(model.predict(arrays), out, atol=1e-5)
    temperature = read_json(root / "models/calibration.json")["temperature"]
    assert model.unwrap_python_model().predictor.temperature == temperature  # calibrated like evaluate's numbers


def test_evaluate_calibrates_with_a_temperature_fitted_on_validation(tiny_run):
    """One temperature fitted on the validation probabilities, applied to the reported probabilities and by
    predict; the predicted classes stay those of the uncalibrated model."""
    root, _ = tiny_run
    from xfer.nets.calibrate import scale
    from xfer.nets.predict import load

    cal = read_json(root / "models/calibration.json")
    t = cal["temperature"]
    assert t > 0 and cal["method"] == "temperature" and cal["val_nll_after"] <= cal["val_nll_before"] + 1e-6
    full = read_json(root / "reports/evaluate.json")
    assert full["temperature"] == t and full["calibrate"] == "temperature"
    assert 0 <= full["test_ece"] <= 1 and 0 <= full["test_ece_uncalibrated"] <= 1
    assert {"test_ece_uncalibrated", "temperature"} <= set(read_json(root / "reports/metrics/evaluate.json"))
    predictor = load(str(root / "models/model.keras"), str(root / "data/raw/classes.json"), ["flip"])
    assert predictor.temperature == t
    files = sorted((root / "data/raw/images").rglob("*.jpg"))[:6]
    batch = predictor.decode_all([f.read_bytes() for f in files])
    raw = np.mean(predictor.views(batch), axis=0)
    calibrated = predictor.probabilities(batch)
    np.testing.assert_allclose(calibrated, scale(raw, t), atol=1e-6)
    assert np.array_equal(calibrated.argmax(axis=1), raw.argmax(axis=1))
    preds = pd.read_csv(root / "reports/plots/test_predictions.csv")
    assert preds["probability"].between(0.5, 1).all()


def test_predict_cli_skips_bad_files(tiny_run, tmp_path, capsys, monkeypatch):
    root, _ = tiny_run
    from xfer.nets.predict import main

    folder = tmp_path / "new"
    folder.mkdir()
    for f in sorted((root / "data/raw/images/blobs").glob("*.jpg"))[:4]:
        (folder / f.name).write_bytes(f.read_bytes())
    (folder / "broken.jpg").write_bytes(b"not really a jpeg")
    monkeypatch.chdir(root)
    assert main([str(folder), "--out", str(tmp_path / "pred.csv")]) == 0
    out = pd.read_csv(tmp_path / "pred.csv")
    assert len(out) == 4 and set(out.columns) == {"path", "class", "probability"}
    captured = capsys.readouterr()
    assert "skipped" in captured.err and "broken.jpg" in captured.err
    assert "predict: 4 images" in captured.out and "1 skipped" in captured.out
    assert main([str(tmp_path / "missing")]) == 2
    # --explain: each image with its Grad-CAM heatmap beside the CSV, named in the column `explanation`.
    from PIL import Image

    assert main([str(folder), "--out", str(tmp_path / "why.csv"), "--explain"]) == 0
    why = pd.read_csv(tmp_path / "why.csv")
    assert list(why["class"]) == list(out["class"]) and len(why) == 4
    for path in why["explanation"]:
        assert path.startswith(str(tmp_path / "why_explained")) and Image.open(path).size == (32, 32)
    assert "heatmaps in" in capsys.readouterr().out


def test_model_server_answers_a_posted_image(tiny_run, tmp_path):
    """`mlflow models serve -m models:/...@candidate --env-manager local` on 127.0.0.1 classifies a POSTed image."""
    import base64
    import json
    import os
    import shutil
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    root, _ = tiny_run
    mlflow_bin = shutil.which("mlflow", path=os.path.dirname(sys.executable))
    if mlflow_bin is None:
        pytest.skip("mlflow command not found")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{root}/mlflow.db",
           "PATH": f"{os.path.dirname(sys.executable)}{os.pathsep}{os.environ.get('PATH', '')}"}  # uvicorn
    server = subprocess.Popen([mlflow_bin, "models", "serve", "-m", "models:/synthetic-classifier@candidate",
                               "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)],
                              env=env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2)
                break
            except OSError:
                if server.poll() is not None or time.time() > deadline:
                    pytest.skip("the MLflow model server did not start")
                time.sleep(1)
        image = sorted((root / "data/raw/images/stripes").glob("*.jpg"))[0].read_bytes()
        body = json.dumps({"dataframe_split": {"columns": ["image"],
                                               "data": [[base64.b64encode(image).decode()]]}}).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=body,
                                     headers={"Content-Type": "application/json"})
        answer = json.loads(urllib.request.urlopen(req, timeout=60).read())
    finally:
        server.terminate()
        server.wait(timeout=30)
    row = answer["predictions"][0]
    assert row["class"] in {"blobs", "stripes"} and 0.5 <= row["probability"] <= 1


def test_stage_runs_nest_under_one_parent_that_summarizes_the_pipeline(tiny_run):
    root, _ = tiny_run
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{root}/mlflow.db")
    exp = client.get_experiment_by_name("synthetic")
    (parent,) = client.search_runs([exp.experiment_id], "tags.role = 'pipeline'")
    runs = {r.info.run_name: r for r in client.search_runs([exp.experiment_id], "tags.role = 'stage'")}
    assert set(runs) == {"download", "split", "scratch-xception_mini"} | {f"{s}-vgg16" for s in TRANSFER[2:]}
    assert "backbone" not in runs["split"].data.tags and runs["views-vgg16"].data.tags["backbone"] == "vgg16"
    assert "backbone" not in runs["scratch-xception_mini"].data.tags  # named after what they use
    links = {s: read_json(root / f"reports/runs/{s}.json")["run_id"] for s in STAGES}
    for run in runs.values():
        assert run.data.tags["pipeline_id"] == "pipeline-under-test" and "git_commit" in run.data.tags
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert parent.info.run_name == "vgg16-pipeline-under-test" and parent.info.status == "FINISHED"
    assert runs["finetune-vgg16"].data.tags["upstream.train_head"] == links["train_head"]
    assert runs["train_head-vgg16"].data.params["head.units"] == "256"
    # The parent: key params (effective values), final metrics, stage times, links, datasets, figures.
    p, m, t = parent.data.params, parent.data.metrics, parent.data.tags
    assert p["backbone.name"] == "vgg16" and p["backbone.weights"] == "random" and p["split.train"] == "12"
    assert runs["featurize-vgg16"].data.params["backbone.weights"] == "random"
    evaluate = read_json(root / "reports/metrics/evaluate.json")
    assert m["test_accuracy"] == pytest.approx(evaluate["test_accuracy"])
    assert m["head_val_accuracy"] == pytest.approx(read_json(root / "reports/metrics/head.json")["val_accuracy"])
    assert "finetuned_val_accuracy" in m and "featurize_images_per_sec" in m and m["model_params"] > 0
    assert m["head_stopped_epoch"] == 3 and m["head_early_stopped"] == 0 and m["finetuned_stopped_epoch"] == 1
    seconds = [m[f"{s}_seconds"] for s in STAGES]
    assert min(seconds) > 0 and m["pipeline_seconds"] == round(sum(seconds), 2) and m["cached_stage_count"] == 0
    assert m["from_scratch_seconds"] == m["pipeline_seconds"]  # rounded to 0.01 s, not 107.47999999999999
    assert {s: t[f"stage.{s}"] for s in STAGES} == links and t["cached_stages"] == "none"
    for key in m:  # no duplicate points; totals have one per stage (its place in the pipeline)
        steps = [p.step for p in client.get_metric_history(parent.info.run_id, key)]
        assert steps == (list(range(len(STAGES))) if key in ("pipeline_seconds", "from_scratch_seconds",
                                                            "cached_stage_count") else [0]), key
    assert {d.dataset.name for d in parent.inputs.dataset_inputs} == {f"synthetic-{s}" for s in ("train", "val",
                                                                                                   "test")}
    (test_input,) = runs["evaluate-vgg16"].inputs.dataset_inputs
    assert test_input.dataset.name == "synthetic-test" and test_input.tags[0].value == "test"
    figures = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"roc.png", "confusion_matrix.png", "params.yaml"} <= figures
    assert "curves.png" in {a.path for a in client.list_artifacts(links["train_head"])}
    # Metric names say what they measure; each epoch logged once; no extra point after the last epoch.
    head = runs["train_head-vgg16"].data.metrics
    assert head["stopped_epoch"] == 3 and head["early_stopped"] == 0
    assert head["best_val_accuracy"] >= head["val_accuracy_at_best_loss"] and "best_val_loss" in head
    history = client.get_metric_history(links["train_head"], "val_loss")
    assert [m.step for m in history] == list(range(3))
    assert [m.step for m in client.get_metric_history(links["finetune"], "val_loss")] == [0]  # 1 epoch
    timed = client.get_metric_history(links["finetune"], "epoch_seconds")  # train + validation, per epoch
    assert [m.step for m in timed] == [0] and timed[0].value > 0
    assert runs["finetune-vgg16"].data.metrics["mean_epoch_seconds"] > 0
    assert runs["evaluate-vgg16"].data.params["evaluate.registered_model"] == "synthetic-classifier"


def test_scratch_baseline_is_trained_scored_and_tracked_like_the_transfer_model(tiny_run):
    """The mini-Xception trained from scratch on the same split: model, metrics, curves, Grad-CAM grids, its MLflow
    run, the parent's summary and a leaderboard row beside vgg16/head and vgg16/finetuned."""
    import keras
    import mlflow

    from xfer.track.compare import leaderboard

    root, _ = tiny_run
    model = keras.saving.load_model(str(root / "models/scratch/xception_mini.keras"))
    assert model.input_shape == (None, 32, 32, 3) and sorted(p.name for p in (root / "models/scratch").iterdir()) \
        == ["xception_mini.keras"]
    metrics = read_json(root / "reports/metrics/scratch.json")
    assert set(metrics) == {f"scratch_test_{k}" for k in ("accuracy", "loss", "auc", "ece", "f1_macro")}
    report = read_json(root / "reports/scratch.json")
    assert report["test_images"] == 12 and report["stopped_epoch"] == 2 and report["tta"] == ["flip"]
    assert list(pd.read_csv(root / "reports/plots/scratch.csv")["epoch"]) == [0, 1]
    for grid in ("misclassified", "correct"):
        assert (root / f"reports/scratch/{grid}.png").read_bytes()[:4] == b"\x89PNG"
    client = mlflow.MlflowClient(f"sqlite:///{root}/mlflow.db")
    run_id = read_json(root / "reports/runs/scratch.json")["run_id"]
    run = client.get_run(run_id)
    assert run.data.params["scratch.model"] == "xception_mini" and run.data.params["evaluate.tta"] == '["flip"]'
    assert [m.step for m in client.get_metric_history(run_id, "val_loss")] == [0, 1]
    assert run.data.metrics["test_accuracy"] == pytest.approx(metrics["scratch_test_accuracy"], abs=1e-6)
    assert {"curves.png", "roc.png", "confusion_matrix.png", "misclassified.png", "correct.png",
            "keras_model"} <= {a.path for a in client.list_artifacts(run_id)}
    exp = client.get_experiment_by_name("synthetic")
    (parent,) = client.search_runs([exp.experiment_id], "tags.role = 'pipeline' and tags.pipeline_id = "
                                                         "'pipeline-under-test'")
    assert parent.data.metrics["scratch_test_accuracy"] == pytest.approx(metrics["scratch_test_accuracy"])
    assert parent.data.params["scratch.name"] == "xception_mini" and parent.data.tags["stage.scratch"] == run_id
    board = leaderboard(client, "synthetic")
    assert {"vgg16/head", "vgg16/finetuned", "scratch/xception_mini"} <= set(board["model"])
    row = board[board["model"] == "scratch/xception_mini"].iloc[0]
    assert row["test_accuracy"] == pytest.approx(metrics["scratch_test_accuracy"]) and row["params"] > 0


def test_transplant_check_catches_wrong_preprocessing(tiny_run):
    root, _ = tiny_run
    from stages.finetune import main

    cfg = load_params([*TINY, "backbone.module=resnet_v2"])  # tf-style scaling instead of VGG's caffe style
    with pytest.raises(XferError, match="disagrees with the head"):
        main(cfg)


@pytest.mark.parametrize("name", ["val_loss", "val_accuracy"])
def test_validation_at_the_boundary_equals_the_whole_model_on_images(tiny_run, name):
    import keras
    import mlflow

    from xfer.data.images import image_dataset
    from xfer.data.paths import image_paths, read_manifest

    root, cfg = tiny_run
    model = keras.saving.load_model(str(root / "models/model.keras"))
    val = read_manifest("val")
    ds = image_dataset(image_paths(val), val["label"].to_numpy(), int(cfg.backbone.image_size), 8)
    whole = model.evaluate(ds, verbose=0, return_dict=True)
    logged = read_json(root / "reports/metrics/finetune.json")
    assert logged[name] == pytest.approx(whole[name.removeprefix("val_")], abs=1e-4)
    run = mlflow.MlflowClient(f"sqlite:///{root}/mlflow.db").get_run(
        read_json(root / "reports/runs/finetune.json")["run_id"])
    assert run.data.metrics["validation_at_boundary"] == 1  # the top-only path was the one measured
    assert name in pd.read_csv(root / "reports/plots/finetune.csv").columns  # callbacks after it saw it


def test_without_fine_tuning_evaluate_reads_the_cached_test_features(tiny_run):
    """(Last in this module: it replaces the fine-tuned model.) The exported model is the base + the head, so the
    plain predictions come from the cached features and only TTA views run the images."""
    from stages import evaluate, finetune

    root, _ = tiny_run
    finetune.main(load_params([*TINY, "finetune.enabled=false"]))
    evaluate.main(load_params([*TINY, "finetune.enabled=false", "evaluate.tta=[]", "evaluate.register=false"]))
    full = read_json(root / "reports/evaluate.json")
    assert full["test_image_passes"] == 0 and "test_images_per_sec" not in full
    assert full["test_accuracy"] == full["head_test_accuracy"]  # calibration keeps the classes
    assert full["test_ece_uncalibrated"] == full["head_test_ece"]  # before it: the head's own probabilities
    evaluate.main(load_params([*TINY, "finetune.enabled=false", "evaluate.tta=[]", "evaluate.register=false",
                               "evaluate.calibrate=none"]))
    full = read_json(root / "reports/evaluate.json")
    assert full["test_loss"] == full["head_test_loss"] and full["temperature"] == 1.0
    assert read_json(root / "models/calibration.json") == {"temperature": 1.0, "method": "none"}
    evaluate.main(load_params([*TINY, "finetune.enabled=false", "evaluate.register=false"]))
    assert read_json(root / "reports/evaluate.json")["test_image_passes"] == 1  # the mirrors only


def test_a_pipeline_whose_stages_were_cached_still_has_their_summary(tiny_run, monkeypatch):
    """(After the others: it reruns evaluate.) As under `dvc repro` after a change only evaluate reads: the new
    pipeline's parent links the cached stages' runs and still holds their figures; compare lists both."""
    import mlflow

    from stages import evaluate
    from xfer.track.compare import leaderboard

    root, _ = tiny_run
    first = {s: read_json(root / f"reports/runs/{s}.json")["run_id"] for s in STAGES}
    monkeypatch.setenv("XFER_PIPELINE_ID", "second")
    evaluate.main(load_params([*TINY, *SCRATCH, "evaluate.register=false"]))
    client = mlflow.MlflowClient(f"sqlite:///{root}/mlflow.db")
    exp = client.get_experiment_by_name("synthetic")
    (parent,) = client.search_runs([exp.experiment_id], "tags.role = 'pipeline' and tags.pipeline_id = 'second'")
    t, m = parent.data.tags, parent.data.metrics
    cached = [s for s in STAGES if s != "evaluate"]  # the scratch baseline too: its outputs match the params
    assert t["ran_stages"] == "evaluate" and t["cached_stages"].split(",") == cached
    assert all(t[f"stage.{s}"] == first[s] for s in cached) and t["stage.evaluate"] != first["evaluate"]
    assert m["cached_stage_count"] == 9 and m["pipeline_seconds"] == round(m["evaluate_seconds"], 2)
    assert {"head_val_accuracy", "featurize_images_per_sec", "train_head_seconds", "test_accuracy",
            "scratch_test_accuracy", "scratch_seconds"} <= set(m)
    assert "cached, from an earlier pipeline" in t["mlflow.note.content"]
    board = leaderboard(client, "synthetic")  # a model two pipelines share through a cached stage is listed once
    assert board["model"].value_counts().to_dict() == {"vgg16/finetuned": 2, "vgg16/head": 1,
                                                       "scratch/xception_mini": 1}
    assert "second" in set(board["pipeline_id"])


def test_evaluate_keeps_its_outputs_when_the_server_is_gone_before_registering(tiny_run, monkeypatch, capsys):
    import mlflow

    import stages.evaluate as evaluate

    root, cfg = tiny_run
    client = mlflow.MlflowClient(f"sqlite:///{root}/mlflow.db")
    versions = len(client.search_model_versions("name='synthetic-classifier'"))
    monkeypatch.setattr(evaluate, "answers", lambda uri: False)
    evaluate.main(cfg)
    assert "model not registered: the tracking server did not answer" in capsys.readouterr().out
    assert len(client.search_model_versions("name='synthetic-classifier'")) == versions
    assert read_json(root / "reports/runs/evaluate.json")["run_id"] in {
        r.info.run_id for r in client.search_runs([client.get_experiment_by_name("synthetic").experiment_id],
                                                  "attributes.status = 'FINISHED' and tags.stage = 'evaluate'")}


def test_evaluate_keeps_the_test_probabilities_it_reported_byte_reproducibly(tiny_run):
    """models/test_probabilities.npy (a cached output, export's reference): the calibrated TTA probabilities behind
    every reported number, in test manifest order; the same inputs give the same bytes."""
    from stages import evaluate

    root, _ = tiny_run
    params = load_params([*TINY, *SCRATCH, "evaluate.register=false"])
    evaluate.main(params)
    first = (root / "models/test_probabilities.npy").read_bytes()
    probs = np.load(root / "models/test_probabilities.npy")
    preds = pd.read_csv(root / "reports/plots/test_predictions.csv")
    classes = read_json(root / "data/raw/classes.json")
    assert probs.shape == (12, 2) and probs.dtype == np.float32
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)
    assert [classes[i] for i in probs.argmax(1)] == list(preds["predicted"])
    np.testing.assert_allclose(probs.max(1), preds["probability"], atol=1e-6)
    labels = [classes.index(c) for c in preds["actual"]]
    accuracy = read_json(root / "reports/evaluate.json")["test_accuracy"]
    assert np.mean(probs.argmax(1) == labels) == pytest.approx(accuracy)
    evaluate.main(params)
    assert (root / "models/test_probabilities.npy").read_bytes() == first

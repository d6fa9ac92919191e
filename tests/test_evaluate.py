"""Metrics equal scikit-learn's; the leaderboard is built from MLflow runs."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, f1_score, log_loss, precision_score, recall_score, roc_auc_score

from xfer.track.metrics import classification_metrics, expected_calibration_error

Y = np.array([0, 0, 1, 1, 1, 0, 1, 0])
P = np.array([[0.1], [0.6], [0.8], [0.4], [0.9], [0.2], [0.7], [0.3]])


def test_binary_metrics_equal_sklearn():
    m = classification_metrics(Y, P, ["cat", "dog"])
    pred = (P[:, 0] > 0.5).astype(int)
    assert m["accuracy"] == accuracy_score(Y, pred) == 0.75
    assert m["auc"] == pytest.approx(roc_auc_score(Y, P[:, 0]))
    assert m["loss"] == pytest.approx(log_loss(Y, P[:, 0]))
    assert m["f1_macro"] == pytest.approx(f1_score(Y, pred, average="macro"))
    assert m["per_class"]["dog"]["precision"] == pytest.approx(precision_score(Y, pred))
    assert m["per_class"]["dog"]["recall"] == pytest.approx(recall_score(Y, pred))
    assert m["confusion_matrix"] == [[3, 1], [1, 3]]


def test_multiclass_metrics_equal_sklearn():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 60)
    p = rng.dirichlet([1, 1, 1], 60)
    p[np.arange(60), y] += 0.5
    p /= p.sum(axis=1, keepdims=True)
    m = classification_metrics(y, p, ["a", "b", "c"])
    assert m["accuracy"] == pytest.approx(accuracy_score(y, p.argmax(1)))
    assert m["auc"] == pytest.approx(roc_auc_score(y, p, multi_class="ovr"))
    assert m["recall_macro"] == pytest.approx(recall_score(y, p.argmax(1), average="macro"))


def test_expected_calibration_error():
    # Confidences 0.9 (right), 0.6 (wrong), 0.8 (right), 0.6 (wrong), 0.9, 0.8, 0.7, 0.7 (all right):
    # bins [0.6,0.7): acc 0 conf 0.6 (2); [0.7,0.8): acc 1 conf 0.7 (2); [0.8,0.9): 1 vs 0.8 (2); [0.9,1]: 1 vs 0.9
    expected = (2 * 0.6 + 2 * 0.3 + 2 * 0.2 + 2 * 0.1) / 8
    assert expected_calibration_error(Y, P) == pytest.approx(expected)
    perfect = np.array([[0.0], [1.0]])
    assert expected_calibration_error(np.array([0, 1]), perfect) == pytest.approx(0.0)


def fake_pipeline(client, exp_id, backbone, accuracy, ips, exp_name, seed=42, units=256):
    """Record a pipeline's parent run as the stages leave it (summary params, metrics and tags), with a stage run
    nested under it that compare must not list."""
    tags = {"pipeline_id": f"p-{backbone}-{seed}", "dvc_exp_name": exp_name}
    parent = client.create_run(exp_id, run_name=exp_name, tags={**tags, "role": "pipeline",
                                                                "config_digest": f"{backbone}-{units}"})
    pid = parent.info.run_id
    for k, v in {"test_accuracy": accuracy, "test_auc": accuracy + 0.01, "model_params": 1e6,
                 "featurize_images_per_sec": ips, "train_head_seconds": 3.0, "finetune_seconds": 7.5}.items():
        client.log_metric(pid, k, v)
    for k, v in {"backbone.name": backbone, "head.units": units, "seed": seed}.items():
        client.log_param(pid, k, v)
    stage = client.create_run(exp_id, run_name=f"evaluate-{backbone}",
                              tags={**tags, "role": "stage", "stage": "evaluate", "mlflow.parentRunId": pid})
    client.log_metric(stage.info.run_id, "test_accuracy", accuracy)
    client.set_terminated(stage.info.run_id)
    client.set_terminated(pid)
    return pid


def test_leaderboard_from_a_temporary_mlflow_database(tmp_path, monkeypatch):
    import mlflow

    from xfer.track.compare import main

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = mlflow.MlflowClient(uri)
    exp_id = client.create_experiment("pets", artifact_location=(tmp_path / "art").as_uri())
    slow = fake_pipeline(client, exp_id, "vgg16", 0.91, 40.0, "exp-a")
    fast = fake_pipeline(client, exp_id, "mobilenetv2", 0.95, 120.0, "exp-b")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    assert main(["--experiment", "pets", "--per-run", "--out", str(tmp_path / "cmp")]) == 0
    import pandas as pd

    board = pd.read_csv(tmp_path / "cmp/leaderboard.csv")
    assert list(board["model"]) == ["mobilenetv2/finetuned", "vgg16/finetuned"]
    assert list(board["run_id"]) == [fast, slow]
    assert list(board["featurize_images_per_sec"]) == [120.0, 40.0]
    assert list(board["experiment"]) == ["exp-b", "exp-a"]
    assert list(board["training_time_s"]) == [10.5, 10.5]  # train_head + finetune seconds
    md = (tmp_path / "cmp/leaderboard.md").read_text()
    assert md.splitlines()[2].startswith("| mobilenetv2/finetuned | exp-b | 0.9500 | 0.9600")
    assert (tmp_path / "cmp/leaderboard.png").read_bytes()[:4] == b"\x89PNG"
    assert main(["--experiment", "nope", "--out", str(tmp_path / "cmp")]) == 2


def test_leaderboard_groups_seeds_with_mean_and_spread(tmp_path, monkeypatch):
    """Runs sharing every parameter except the seed form one row: mean ± std and the number of seeds."""
    import mlflow
    import pandas as pd

    from xfer.track.compare import main

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = mlflow.MlflowClient(uri)
    exp_id = client.create_experiment("pets", artifact_location=(tmp_path / "art").as_uri())
    for seed, acc in [(1, 0.90), (2, 0.92), (3, 0.94)]:
        fake_pipeline(client, exp_id, "vgg16", acc, 40.0, f"s{seed}", seed=seed)
    fake_pipeline(client, exp_id, "vgg16", 0.95, 40.0, "wide", seed=1, units=512)  # other params: own row
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    assert main(["--experiment", "pets", "--out", str(tmp_path / "cmp")]) == 0
    board = pd.read_csv(tmp_path / "cmp/leaderboard.csv")
    assert list(board["seeds"]) == [1, 3] and list(board["experiment"]) == ["wide", "s1, s2, s3"]
    assert board["test_accuracy"].tolist() == pytest.approx([0.95, 0.92])
    assert board["test_accuracy_std"].tolist() == pytest.approx([0.0, 0.02])
    md = (tmp_path / "cmp/leaderboard.md").read_text()
    assert "| vgg16/finetuned | s1, s2, s3 | 3 | 0.9200 ± 0.0200 |" in md
    # What differs between the rows is a column (head.units); what they share (backbone.name) and the grouped
    # seed are not; times read as 10.5, not 10.5000.
    assert list(board["head.units"]) == [512, 256] and "backbone.name" not in board and "seed" not in board
    header = md.splitlines()[0].split(" | ")
    assert header[-1] == "head.units |" and md.splitlines()[2].endswith("| 10.5 | 512 |"), md
    assert main(["--experiment", "pets", "--per-run", "--out", str(tmp_path / "runs")]) == 0
    assert len(pd.read_csv(tmp_path / "runs/leaderboard.csv")) == 4


def test_leaderboard_rows_are_models_head_finetuned_and_scratch_baselines(tmp_path, monkeypatch):
    """A pipeline gives <backbone>/head, <backbone>/finetuned and scratch/<name> rows; a stage two pipelines share
    (cached) gives one row; scratch seeds group by the baseline's own settings."""
    import mlflow
    import pandas as pd

    from xfer.track.compare import main

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = mlflow.MlflowClient(uri)
    exp_id = client.create_experiment("pets", artifact_location=(tmp_path / "art").as_uri())
    for seed, exp_name, lr in [(1, "a", "1e-5"), (1, "b", "3e-5"), (2, "c", "1e-5")]:
        pid = fake_pipeline(client, exp_id, "vgg16", 0.96 + seed / 100, 40.0, exp_name, seed=seed)
        for k, v in {"head_test_accuracy": 0.9 + seed / 100, "scratch_test_accuracy": 0.7 + seed / 100,
                     "scratch_model_params": 991041, "scratch_seconds": 60.0}.items():
            client.log_metric(pid, k, v)
        client.log_param(pid, "scratch.name", "convnet")
        client.log_param(pid, "evaluate.tta", '["flip"]')
        for k, v in {"stage.train_head": f"head-{seed}", "stage.scratch": f"scratch-{seed}",
                     "stage.evaluate": f"evaluate-{exp_name}", "scratch_config_digest": "convnet-settings",
                     "config_digest": f"vgg16-{lr}"}.items():
            client.set_tag(pid, k, v)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    assert main(["--experiment", "pets", "--per-run", "--out", str(tmp_path / "runs")]) == 0
    runs = pd.read_csv(tmp_path / "runs/leaderboard.csv")
    assert runs["model"].value_counts().to_dict() == {"vgg16/finetuned": 3, "vgg16/head": 2, "scratch/convnet": 2}
    head = runs[runs["model"] == "vgg16/head"]
    assert set(head["tta"]) == {"none"} and set(runs[runs["model"] == "vgg16/finetuned"]["tta"]) == {"flip"}
    scratch = runs[runs["model"] == "scratch/convnet"]
    assert sorted(scratch["test_accuracy"]) == pytest.approx([0.71, 0.72]) and set(scratch["params"]) == {991041}
    assert set(scratch["training_time_s"]) == {60.0} and scratch["featurize_images_per_sec"].isna().all()
    assert main(["--experiment", "pets", "--out", str(tmp_path / "cmp")]) == 0
    board = pd.read_csv(tmp_path / "cmp/leaderboard.csv")
    row = board[board["model"] == "scratch/convnet"].iloc[0]
    assert row["seeds"] == 2 and row["test_accuracy"] == pytest.approx(0.715)
    assert "| scratch/convnet | a, b, c | 2 | 0.7150 ± 0.0071 |" in (tmp_path / "cmp/leaderboard.md").read_text()
    assert main(["--experiment", "pets", "--per-model", "--out", str(tmp_path / "best")]) == 0
    assert sorted(pd.read_csv(tmp_path / "best/leaderboard.csv")["model"]) == ["scratch/convnet", "vgg16/finetuned",
                                                                             "vgg16/head"]


def test_probabilities_that_sum_to_one_only_up_to_rounding_give_no_warning():
    """A float16/int8 runtime's rows sum to 1 +- 1e-3: the log loss renormalises them instead of warning."""
    import warnings

    from sklearn.metrics import log_loss

    from xfer.track.metrics import classification_metrics

    y = np.array([0, 1, 1, 0])
    p = np.array([[0.8, 0.199], [0.3, 0.698], [0.1, 0.901], [0.6, 0.4]])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loss = classification_metrics(y, p, ["cat", "dog"])["loss"]
    assert loss == pytest.approx(log_loss(y, p / p.sum(axis=1, keepdims=True)))

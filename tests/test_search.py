"""xfer search on generated features: the space, CV selection, pruning, the preset, two workers on one study; and
temperature scaling (xfer.nets.calibrate)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf

from tests.conftest import TINY, assert_features_close, tiny_project
from xfer import XferError
from xfer.core.config import compose_conf, load_params
from xfer.core.presets import write_preset
from xfer.nets.search import (
    Space,
    cv_data,
    cv_scores,
    fold_rows,
    folds_of,
    load_space,
    parse_space,
    preset_values,
    trial_config,
)


def blobs(n_per_class: int, dim: int = 6, seed: int = 0, n_classes: int = 2, sep: float = 3.0):
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(n_classes), n_per_class)
    centers = rng.normal(0, sep, (n_classes, dim))
    return (centers[y] + rng.normal(0, 1, (len(y), dim))).astype(np.float32), y


def xor_features(n: int, seed: int = 0):
    """Four clusters, label = XOR of the quadrant: a trained MLP separates them, a random one does not."""
    rng = np.random.default_rng(seed)
    q = rng.integers(0, 2, (n, 2))
    x = (q * 2.0 - 1) * 3 + rng.normal(0, 0.5, (n, 2))
    return np.hstack([x, rng.normal(0, 0.1, (n, 2))]).astype(np.float32), (q[:, 0] ^ q[:, 1]).astype(np.int64)


def predicted(p: np.ndarray) -> np.ndarray:
    return (p[:, 0] > 0.5).astype(int) if p.shape[1] == 1 else p.argmax(1)


@pytest.fixture
def cfg(project):
    return load_params(TINY)


def test_space_parsing_keys_ranges_and_one_line_errors(cfg):
    import optuna

    space = parse_space({"folds": 3, "max_epochs": 4, "space": {
        "head.units": {"choices": [8, 16]}, "head.learning_rate": {"low": 1e-4, "high": 1e-2, "log": True},
        "head.dropout": {"low": 0.0, "high": 0.5}, "featurize.train_views": {"choices": [0, 1]}}}, cfg,
        cached_views=1)
    assert space.folds == 3 and set(space.params) == {"head.units", "head.learning_rate", "head.dropout",
                                                      "featurize.train_views"}
    point = space.suggest(optuna.trial.FixedTrial({"head.units": 16, "head.learning_rate": 1e-3, "head.dropout": 0.2,
                                                   "featurize.train_views": 1}))
    assert point == {"head.units": 16, "head.learning_rate": 1e-3, "head.dropout": 0.2, "featurize.train_views": 1}
    study = optuna.create_study()
    drawn = space.suggest(study.ask())
    assert drawn["head.units"] in (8, 16) and 1e-4 <= drawn["head.learning_rate"] <= 1e-2
    bad = {
        "head.unitz": "head.unitz: no such key in params.yaml",
        "backbone.image_size": "backbone.image_size needs new features",
        "backbone.name": "queue DVC experiments for it instead: dvc exp run --queue -S backbone.name=A,B",
        "scratch.name": "scratch.name is not searched on cached features",
    }
    for key, message in bad.items():
        with pytest.raises(XferError) as err:
            parse_space({"space": {key: {"choices": [1, 2]}}}, cfg)
        assert message in str(err.value) and "\n" not in str(err.value), str(err.value)
    with pytest.raises(XferError, match="only 1 views are cached; rerun the views stage"):
        parse_space({"space": {"featurize.train_views": {"choices": [0, 2]}}}, cfg, cached_views=1)
    with pytest.raises(XferError, match="head.dropout: need low < high"):
        parse_space({"space": {"head.dropout": {"low": 0.5, "high": 0.1}}}, cfg)
    with pytest.raises(XferError, match="unknown setting 'trails'"):
        parse_space({"trails": 3, "space": {"head.units": {"choices": [8]}}}, cfg)


def test_storage_urls_are_shown_without_their_password():
    from xfer.nets.search import default_storage
    from xfer.nets.study import redacted

    assert redacted("postgresql://xfer:s3cret@db:5432/optuna") == "postgresql://xfer:***@db:5432/optuna"
    assert default_storage("sqlite:////r/mlruns/mlflow.db") == "sqlite:////r/mlruns/optuna.db"
    with pytest.raises(XferError, match="--storage postgresql://"):
        default_storage("http://127.0.0.1:5000")


def test_a_worker_that_loses_the_schema_creation_race_opens_the_storage(tmp_path, monkeypatch):
    """Two workers started together on a fresh optuna.db both find no tables; the loser's CREATE TABLE fails
    ("table studies already exists", seen in CI). It must retry and open the schema the winner made."""
    import optuna
    import sqlalchemy

    from xfer.nets.study import storage_for

    real, calls = optuna.storages.RDBStorage, []

    class Racing(real):
        def __init__(self, url, **kwargs):
            calls.append(url)
            if len(calls) == 1:
                real(url, **kwargs)  # the other worker wins the race ...
                lost = Exception("table studies already exists")
                raise sqlalchemy.exc.OperationalError("CREATE TABLE studies", {}, lost)
            super().__init__(url, **kwargs)

    monkeypatch.setattr(optuna.storages, "RDBStorage", Racing)
    storage, url = storage_for(f"sqlite:///{tmp_path}/optuna.db")
    assert len(calls) == 2 and optuna.create_study(study_name="s", storage=storage).study_name == "s"


def test_a_swallowed_ctrl_c_still_ends_the_search_after_the_trial(monkeypatch):
    """A SIGINT whose KeyboardInterrupt a library swallowed (a destructor run by gc_after_trial, TensorFlow) is still
    remembered; the callback after each trial raises it, so the search stops instead of running its budget."""
    import signal as sig

    from xfer.core import signals
    from xfer.nets.study import stop_if_interrupted

    monkeypatch.setattr(signals, "received", [])
    stop_if_interrupted(None, None)  # nothing received: the search goes on
    monkeypatch.setattr(signals, "received", [sig.SIGINT])
    with pytest.raises(KeyboardInterrupt):
        stop_if_interrupted(None, None)


def test_the_shipped_spaces_parse_against_the_default_params(cfg):
    space = load_space("default", cfg)
    assert space.params and all(k.startswith("head.") for k in space.params) and space.folds >= 3
    assert not space.fine_tunes
    cfg.finetune.trunk_views = 2  # TINY's 0 (fine-tuning on images) is refused by a fine-tuning space
    ft = load_space("finetune", cfg)
    assert ft.fine_tunes and ft.folds >= 3 and ft.trunk_views(cfg) == 2
    assert {"finetune.enabled", "finetune.learning_rate", "finetune.epochs", "finetune.schedule",
            "finetune.warmup_epochs", "head.units"} <= set(ft.params)
    assert max(ft.params["finetune.epochs"]["choices"]) <= 4  # a trial's fine-tuning is capped
    with pytest.raises(XferError, match="no such search space; valid in .*: default, finetune"):
        load_space("nope", cfg)


def test_finetune_keys_parse_and_the_ones_a_trial_cannot_change_fail_in_one_line(cfg):
    cfg.finetune.trunk_views = 2
    space = parse_space({"finetune_max_epochs": 2, "space": {
        "finetune.enabled": {"choices": [True, False]}, "finetune.learning_rate": {"low": 1e-6, "high": 1e-4,
                                                                                   "log": True},
        "finetune.schedule": {"choices": ["constant", "cosine"]}, "finetune.trunk_views": {"choices": [1, 3]}}}, cfg)
    assert space.fine_tunes and space.trunk_views(cfg) == 3 and space.finetune_max_epochs == 2
    c = trial_config(cfg, space, {"finetune.enabled": True, "finetune.learning_rate": 3e-5})
    assert c.finetune.epochs == min(2, cfg.finetune.epochs) and c.finetune.learning_rate == 3e-5
    bad = {
        "backbone.unfreeze_from": ({"choices": ["block4_conv1", "block5_conv1"]},
                                   "backbone.unfreeze_from needs new trunk views (the activations at the new boundary, "
                                   "a trunk stage run); queue DVC experiments for it instead: dvc exp run --queue -S "
                                   "backbone.unfreeze_from=A,B"),
        "finetune.augment.zoom": ({"choices": [0.1, 0.2]}, "finetune.augment.zoom needs new trunk views"),
        "finetune.trunk_views": ({"choices": [0, 1]}, "finetune.trunk_views=0 fine-tunes on images every epoch"),
        "finetune.enabled": ({"choices": [1, 0]}, "finetune.enabled: choices must be true/false"),
    }
    for key, (d, message) in bad.items():
        with pytest.raises(XferError) as err:
            parse_space({"space": {key: d}}, cfg)
        assert message in str(err.value) and "\n" not in str(err.value), str(err.value)
    with pytest.raises(XferError, match="finetune.epochs: set by finetune_max_epochs of the space"):
        parse_space({"finetune_max_epochs": 3, "space": {"finetune.epochs": {"choices": [2, 3]}}}, cfg)
    off = OmegaConf.merge(cfg, {"finetune": {"enabled": False}})
    with pytest.raises(XferError, match="finetune.enabled is false in params.yaml and not in the space: add"):
        parse_space({"space": {"finetune.learning_rate": {"low": 1e-6, "high": 1e-4}}}, off)
    on_images = OmegaConf.merge(cfg, {"finetune": {"trunk_views": 0}})
    with pytest.raises(XferError, match="params.yaml has finetune.trunk_views=0 .* pass finetune.trunk_views=2"):
        parse_space({"space": {"finetune.learning_rate": {"low": 1e-6, "high": 1e-4}}}, on_images)


def test_cv_folds_cover_train_and_val_and_views_join_only_their_training_images():
    x_tr, y_tr = blobs(10, seed=1)
    x_va, y_va = blobs(4, seed=2)
    views = np.stack([x_tr + 100, x_tr + 200]).reshape(-1, x_tr.shape[1])  # view-major, as the views stage writes
    data = cv_data(x_tr, y_tr, views, x_va, y_va, "gap", 2)
    assert data.x.shape == (28, 6) and data.n_train == 20 and data.views.shape == (2, 20, 6)
    folds = folds_of(data.y, 4, seed=0)
    held = np.sort(np.concatenate([h for _, h in folds]))
    assert np.array_equal(held, np.arange(28))  # every train and val image held out exactly once
    train_idx = folds[0][0]
    x, y = fold_rows(data, train_idx, 1)
    own = train_idx[train_idx < 20]
    assert len(x) == len(train_idx) + len(own)
    np.testing.assert_allclose(x[len(train_idx):], data.x[own] + 100)  # view 0 of its own training images only
    maps = np.random.default_rng(0).normal(size=(5, 3, 3, 4)).astype(np.float32)  # GAP pooled once up front
    pooled = cv_data(maps, np.array([0, 1, 0, 1, 0]), None, maps[:2], np.array([0, 1]), "gap", 2)
    np.testing.assert_allclose(pooled.x[:5], maps.mean(axis=(1, 2)), rtol=1e-6)


def test_cv_selection_prefers_the_head_that_generalizes(cfg):
    """Scores are held-out fold accuracies; a trainable head beats a frozen one (learning rate ~0)."""
    x, y = xor_features(120)
    data = cv_data(x[:90], y[:90], None, x[90:], y[90:], "gap", 2)
    folds = folds_of(data.y, 3, seed=0)
    good = OmegaConf.merge(cfg.head, {"units": 32, "learning_rate": 3e-2, "optimizer": "adam", "epochs": 15,
                                      "label_smoothing": 0.0, "dropout": 0.0})
    frozen = OmegaConf.merge(good, {"learning_rate": 1e-12, "epochs": 1})
    reported = []
    s_good = cv_scores(data, good, folds, seed=0, report=lambda f, m: reported.append((f, m)))
    s_frozen = cv_scores(data, frozen, folds, seed=0)
    assert len(s_good) == 3 and [f for f, _ in reported] == [0, 1, 2]
    assert np.isclose(reported[-1][1], np.mean(s_good))
    assert np.mean(s_good) > 0.9 and np.mean(s_good) > np.mean(s_frozen) + 0.2, (s_good, s_frozen)


def test_hopeless_trials_are_pruned_and_the_winner_is_the_cv_best(cfg):
    import optuna

    from xfer.nets.study import Objective, summary

    x, y = xor_features(120, seed=3)
    space = Space("t", {"head.learning_rate": {"choices": [3e-2, 1e-12]}}, folds=3, max_epochs=15, startup_trials=2)
    cfg.head.units, cfg.head.optimizer, cfg.head.dropout, cfg.head.label_smoothing = 32, "adam", 0.0, 0.0
    logged = []
    objective = Objective(cfg, space, (x[:90], y[:90], None, x[90:], y[90:], 2), lambda *a: logged.append(a))
    study = optuna.create_study(direction="maximize",
                                pruner=optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=0))
    for lr in (3e-2, 3e-2, 1e-12):
        study.enqueue_trial({"head.learning_rate": lr})
    study.optimize(objective, n_trials=3)
    states = [t.state for t in study.trials]
    assert states == [optuna.trial.TrialState.COMPLETE] * 2 + [optuna.trial.TrialState.PRUNED]
    assert [a[3] for a in logged] == ["COMPLETE", "COMPLETE", "PRUNED"] and logged[2][2]["folds_run"] == 1
    base = objective.score({"head.learning_rate": 1e-12})
    out = summary(study, base, space)
    assert out["trials_pruned"] == 1 and out["best_params"] == {"head.learning_rate": 3e-2}
    assert out["gain"] > 0.2 and out["gain_std"] >= 0 and np.isclose(out["baseline_cv_accuracy"], np.mean(base))
    assert out["adopted"] is True
    noise = np.asarray(study.best_trial.user_attrs["fold_scores"]) + np.array([0.02, -0.03, 0.0])
    assert summary(study, list(noise), space)["adopted"] is False  # a gain within the noise keeps the baseline


def test_the_winner_is_written_as_a_preset_that_composes_back(project):
    cfg = load_params(["backbone=mobilenet", "backbone.image_size=160", "finetune.enabled=false"])
    path = write_preset("search-unit", cfg, {"head.units": 64, "head.dropout": 0.125}, "line one\nline two")
    text = path.read_text()
    assert path == project / "conf/experiment/search-unit.yaml" and text.startswith("# @package _global_\n# line one")
    composed = compose_conf(["experiment=search-unit"])
    assert composed.backbone.name == "mobilenet" and composed.backbone.image_size == 160
    assert composed.head.units == 64 and composed.head.dropout == 0.125 and composed.finetune.enabled is False
    expected = OmegaConf.to_container(cfg, resolve=True)
    expected["head"].update(units=64, dropout=0.125)
    assert OmegaConf.to_container(composed, resolve=True) == expected
    assert "vgg16" not in text and "seed" not in text  # only what differs from conf/'s defaults
    assert "  - override /backbone: mobilenet\n" in text
    other = load_params(["data=synthetic", "data.per_class=5", "head=flatten", "head.units=32"])
    write_preset("search-other", other, {"head.dropout": 0.25}, "x")  # sections whose keys differ: group overrides
    expected = OmegaConf.to_container(other, resolve=True)
    expected["head"]["dropout"] = 0.25
    assert OmegaConf.to_container(compose_conf(["experiment=search-other"]), resolve=True) == expected


def test_a_finetune_winner_is_written_as_a_preset_that_composes_back(project):
    cfg = compose_conf(["experiment=mobilenet-offline"])  # fine-tuning off, as the preset a search starts from
    space = load_space("finetune", cfg)
    point = {"head.units": 128, "head.dropout": 0.25, "finetune.enabled": True, "finetune.learning_rate": 3e-5,
             "finetune.epochs": 3, "finetune.schedule": "cosine", "finetune.warmup_epochs": 1,
             "finetune.trunk_views": 1}
    values = preset_values(cfg, space, point)
    assert values == point
    write_preset("search-ft", cfg, values, "a fine-tuning winner")
    composed = compose_conf(["experiment=search-ft"])
    assert composed.finetune.enabled is True and composed.finetune.learning_rate == 3e-5
    assert composed.finetune.epochs == 3 and composed.finetune.schedule == "cosine"
    assert composed.finetune.trunk_views == 1 and composed.backbone.image_size == 320
    expected = OmegaConf.to_container(cfg, resolve=True)
    for key, value in point.items():
        section, leaf = key.split(".")
        expected[section][leaf] = value
    assert OmegaConf.to_container(composed, resolve=True) == expected
    # a winner that turns fine-tuning off keeps params.yaml's other finetune.* (they would do nothing)
    off = preset_values(cfg, space, {**point, "finetune.enabled": False})
    assert off == {"head.units": 128, "head.dropout": 0.25, "finetune.enabled": False}
    write_preset("search-off", cfg, off, "x")
    assert compose_conf(["experiment=search-off"]).finetune.learning_rate == cfg.finetune.learning_rate


def test_a_finetune_trial_runs_the_finetune_stages_fit_on_the_folds(tmp_path, monkeypatch):
    """The trial fine-tunes with the stage's own fit (xfer.nets.finetune.fit_finetune), on the trunk stage's views:
    the top's weights move, a near-zero learning rate gives back the head's scores (top + head on the boundary
    activations = the head on the cached features), enabled=false never fine-tunes; `xfer search` runs it whole."""
    import optuna

    import stages.finetune
    from xfer.nets import finetune as ft
    from xfer.nets.study import Objective
    from xfer.nets.study import main as search

    assert stages.finetune.fit_finetune is ft.fit_finetune  # the stage's loop is the trials' loop
    real, calls = ft.fit_finetune, []

    def spy(model, *args, **kwargs):
        history = real(model, *args, **kwargs)
        calls.append([np.array(w) for w in model.get_weights()])
        return history

    with tiny_project(tmp_path / "proj", ["download", "split", "featurize", "views", "trunk"], "search-ft",
                      ["finetune.trunk_views=1"]) as (root, cfg):
        monkeypatch.setattr(ft, "fit_finetune", spy)
        space = Space("ft", {"finetune.enabled": {"choices": [True, False]},
                             "finetune.learning_rate": {"low": 1e-12, "high": 1e-1, "log": True}}, folds=2)
        objective = Objective.from_cache(cfg, space)
        off = objective.score({"finetune.enabled": False, "finetune.learning_rate": 1e-2})
        assert calls == [] and objective.bd is None
        frozen = objective.score({"finetune.enabled": True, "finetune.learning_rate": 1e-12})
        bd = objective.bd
        assert len(calls) == 2 and bd.source == "trunk cache" and bd.k == 1
        held = min(len(h) for _, h in objective.folds)
        # the rows line up: the top at its cached weights maps the boundary activations to the cached features
        from xfer.nets.search import pool

        assert_features_close(pool(np.asarray(bd.top.predict(bd.acts, verbose=0)), "gap"), objective.data_for("gap").x)
        assert np.allclose(frozen, off, atol=1.01 / held), (frozen, off)  # at most one image flips per fold
        calls.clear()
        tuned = objective.score({"finetune.enabled": True, "finetune.learning_rate": 1e-3})
        assert len(calls) == 2 and len(tuned) == 2
        top = bd.top.get_weights()
        moved = [float(np.max(np.abs(a - b))) for a, b in zip(top, bd.start, strict=True)]
        assert max(moved) > 1e-4, moved  # fine-tuning trained the base's top
        # views the trunk cache lacks are made by the search, as the trunk stage makes them
        from xfer.nets.tuning import boundary_data

        made = boundary_data(cfg, 2)
        assert made.source == "made by the search" and made.k == 2
        assert_features_close(made.views[: bd.n_train], bd.views[: bd.n_train], "float16")
        assert_features_close(made.acts, bd.acts)
        # the command: a fine-tuning space, its winner written as a preset
        (root / "conf/search/ft.yaml").write_text(
            "folds: 2\nmax_epochs: 2\nstartup_trials: 2\nspace:\n  finetune.enabled: {choices: [true, false]}\n"
            "  finetune.learning_rate: {low: 1.0e-5, high: 1.0e-2, log: true}\n  head.units: {choices: [8, 16]}\n")
        assert search(["ft", *TINY, "finetune.trunk_views=1", "--trials", "3", "--name", "ft", "--study", "ft"]) == 0
        report = json.loads((root / "reports/search/ft.json").read_text())
        study = optuna.load_study(study_name="ft", storage=f"sqlite:///{root}/optuna.db")  # beside mlflow.db
        assert len(study.trials) == 3 and report["winner_values"]["finetune.enabled"] == \
            study.best_params["finetune.enabled"]
        preset = compose_conf(["experiment=search-ft"], root)
        winner = report["winner_values"] if report["adopted"] else {}
        assert preset.finetune.enabled == winner.get("finetune.enabled", True)  # TINY's own: enabled


def test_calibration_lowers_ece_of_an_over_smoothed_head_and_keeps_the_classes(tmp_path, cfg):
    from xfer.core.runtime import seed_everything
    from xfer.nets.calibrate import calibrate, fit_temperature, read_temperature, scale
    from xfer.nets.models import fit_head
    from xfer.track.metrics import expected_calibration_error

    for n_classes in (2, 3):
        x, y = blobs(150, n_classes=n_classes, seed=n_classes, sep=1.2)
        order = np.random.default_rng(0).permutation(len(y))
        x, y = x[order], y[order]
        tr, va, te = slice(0, 200 if n_classes == 2 else 300), slice(-100, -50), slice(-50, None)
        h = OmegaConf.merge(cfg.head, {"label_smoothing": 0.6, "epochs": 20, "learning_rate": 1e-2, "units": 16})
        seed_everything(0, True)
        model, _ = fit_head(x[tr], y[tr], x[va], y[va], h, n_classes, tmp_path / "best.weights.h5")
        p_val, p_test = model.predict(x[va], verbose=0), model.predict(x[te], verbose=0)
        t = fit_temperature(y[va], p_val)
        assert t < 0.8, t  # smoothing squeezed the probabilities: sharpened back
        before, after = expected_calibration_error(y[te], p_test), expected_calibration_error(y[te], scale(p_test, t))
        assert after < before - 0.05, (before, after)
        assert scale(p_test, t).shape == p_test.shape
        assert np.array_equal(predicted(scale(p_test, t)), predicted(p_test))
    path = tmp_path / "calibration.json"
    assert calibrate("temperature", y[va], p_val, path) == read_temperature(path) == json.loads(path.read_text())[
        "temperature"]
    report = json.loads(path.read_text())
    assert report["val_ece_after"] < report["val_ece_before"] and report["method"] == "temperature"
    assert calibrate("none", None, None, path) == 1.0 and read_temperature(tmp_path / "absent.json") == 1.0
    with pytest.raises(XferError, match="evaluate.calibrate: 'platt' is not one of temperature, none"):
        calibrate("platt", y[va], p_val, path)


TINY_SPACE = ("folds: 3\nmax_epochs: 2\nstartup_trials: 2\nspace:\n  head.units: {choices: [8, 16]}\n"
              "  head.learning_rate: {low: 1.0e-3, high: 1.0e-2, log: true}\n")


def two_workers(root: Path, env: dict[str, str]) -> list[str]:
    """Start two `xfer search` workers together on study "shared" (conf/search/tiny.yaml, 2 trials each) in the
    project at ``root``; both must succeed. Returns their command (without --worker)."""
    (root / "conf/search/tiny.yaml").write_text(TINY_SPACE)
    cmd = [sys.executable, "-m", "xfer", "search", "tiny", *TINY, "--trials", "2", "--study", "shared",
           "--name", "tiny"]
    procs = [subprocess.Popen([*cmd, "--worker", str(w)], cwd=root, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for w in (1, 2)]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (out, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-3000:]
        assert "search: best cv_accuracy" in out and "dvc exp run -S experiment=search-tiny" in out
        assert "ExperimentalWarning" not in err and "retracing" not in err, err[-3000:]  # a quiet search
    return cmd


@pytest.mark.e2e
def test_two_workers_share_one_study_tracked_in_mlflow(tmp_path):
    """`xfer search` in two processes on one study (SQLite beside mlruns/mlflow.db), the test split deleted first:
    one MLflow parent, every trial nested with its state, the figures, and a preset."""
    import mlflow
    import optuna

    with tiny_project(tmp_path / "proj", ["download", "split", "featurize", "views"], "search-test") as (root, _):
        for f in (root / "data/features/vgg16").glob("test_*"):
            f.unlink()  # the search never reads the test split
        env = {**os.environ, "PYTHONPATH": str(root), "MLFLOW_TRACKING_URI": f"sqlite:///{root}/mlruns/mlflow.db"}
        (root / "mlruns").mkdir(exist_ok=True)
        cmd = two_workers(root, env)
        storage = f"sqlite:///{root}/mlruns/optuna.db"
        study = optuna.load_study(study_name="shared", storage=storage)
        assert len(study.trials) == 4 and "baseline_fold_scores" in study.user_attrs
        client = mlflow.MlflowClient(f"sqlite:///{root}/mlruns/mlflow.db")
        exp = client.get_experiment_by_name("synthetic").experiment_id
        (parent,) = client.search_runs([exp], "tags.role = 'search'")
        trials = client.search_runs([exp], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
        assert sorted(int(r.data.tags["trial"]) for r in trials) == [0, 1, 2, 3]
        assert all(r.data.tags["state"] in ("COMPLETE", "PRUNED") and "head.units" in r.data.params for r in trials)
        assert any("cv_accuracy" in r.data.metrics for r in trials)
        artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
        assert {"optimization_history.png", "search-tiny.yaml"} <= artifacts, artifacts
        preset = compose_conf(["experiment=search-tiny"], root)
        report = json.loads((root / "reports/search/shared.json").read_text())
        expected = study.best_params["head.units"] if report["adopted"] else load_params(TINY, root).head.units
        assert preset.head.units == expected and preset.data.name == "synthetic"
        assert preset.head.epochs == 3  # TINY's own: the trials' max_epochs (2) speeds up the search only
        # Ctrl-C: the running trial is dropped, the best so far kept and written again
        worker = subprocess.Popen([*cmd, "--trials", "100", "--worker", "3"], cwd=root, env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,  # Ctrl-C as in a
                                  # terminal: a background job (`.ci/run &`, nohup) starts with SIGINT ignored
                                  preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and len(optuna.load_study(study_name="shared", storage=storage).trials) < 6:
            time.sleep(0.5)
        worker.send_signal(signal.SIGINT)
        out, err = worker.communicate(timeout=300)
        assert worker.returncode == 130 and "interrupted; keeping the best trial so far" in err, err[-3000:]
        assert "search: best cv_accuracy" in out and (root / "conf/experiment/search-tiny.yaml").is_file()
        assert json.loads((root / "reports/search/shared.json").read_text())["interrupted"] is True
        (root / "conf/search/bad.yaml").write_text("space:\n  backbone.image_size: {choices: [64, 128]}\n")
        bad = subprocess.run([sys.executable, "-m", "xfer", "search", "bad", *TINY], cwd=root, env=env,
                             capture_output=True, text=True)
        assert bad.returncode == 2 and bad.stderr.strip().splitlines() == [
            f"error: {root}/conf/search/bad.yaml: backbone.image_size needs new features (a search runs on the current "
            "cache); queue DVC experiments for it instead: dvc exp run --queue -S backbone.image_size=A,B"]

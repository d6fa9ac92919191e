"""Head training and fine-tuning: the head learns, BatchNorm stays frozen, the boundary is respected,
three classes go through end to end."""

from __future__ import annotations

import importlib

import numpy as np
import pytest
from omegaconf import OmegaConf
from PIL import Image

from tests.conftest import REPO
from xfer.core.config import load_params
from xfer.core.files import read_json, write_json


def head_cfg(**kw):
    return OmegaConf.merge(OmegaConf.load(REPO / "conf/head/flatten.yaml"), kw)


@pytest.mark.parametrize("pooling", ["flatten", "gap"])
def test_head_learns_separable_features(pooling):
    import keras

    from xfer.nets.models import build_head, compile_model

    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 400)
    x = rng.normal(0, 1, (400, 2, 2, 16)).astype("float32") + y[:, None, None, None] * 1.5
    head = build_head(x.shape[1:], 2, head_cfg(pooling=pooling, units=32))
    compile_model(head, head_cfg(), 2)
    head.fit(x[:300], y[:300], epochs=25, batch_size=32, verbose=0)
    assert head.evaluate(x[300:], y[300:], verbose=0)[1] > 0.95
    assert head.output_shape == (None, 1)  # sigmoid for two classes
    assert build_head(x.shape[1:], 3, head_cfg()).output_shape == (None, 3)  # softmax for more


def test_class_weights_balanced():
    from xfer.nets.models import class_weights

    w = class_weights([0, 0, 0, 1], "balanced", 2)
    assert w == pytest.approx({0: 4 / 6, 1: 2.0})
    assert class_weights([0, 1], None, 2) is None


def test_finetuning_keeps_batchnorm_frozen_and_respects_the_boundary(project):
    """MobileNetV2 (has BatchNorm): one training step moves the unfrozen convs only; BN statistics never move."""
    import keras

    from stages.finetune import assemble, unfreeze_top
    from xfer.nets.backbones import backbone_cnn, build_base
    from xfer.nets.models import build_head, compile_model

    cfg = load_params(["backbone=mobilenetv2", "backbone.weights=null", "backbone.image_size=32"])
    base = build_base(cfg.backbone)
    feats = project / "data/features/mobilenetv2"
    feats.mkdir(parents=True)
    backbone_cnn(base).save_weights(str(feats / "base.weights.h5"))
    write_json(feats / "meta.json", {"precision": "float32", "pooling": None})
    head = build_head(base.output_shape[1:], 2, head_cfg(units=8))
    model, base = assemble(cfg, head, seed=0)
    cnn = backbone_cnn(base)
    unfrozen = unfreeze_top(base, cfg.backbone.unfreeze_from)
    names = [layer.name for layer in cnn.layers]
    after = names[names.index("block_16_expand"):]
    expected = [n for n in after if cnn.get_layer(n).weights and "BN" not in n and "bn" not in n.lower()]
    assert unfrozen == len(expected)
    bns = [layer for layer in cnn.layers if isinstance(layer, keras.layers.BatchNormalization)]
    assert bns and not any(layer.trainable for layer in bns)
    assert {w.path for w in model.trainable_weights} == \
        {w.path for n in expected for w in cnn.get_layer(n).weights} | {w.path for w in head.weights}
    stats = [np.array(v) for layer in bns for v in (layer.moving_mean, layer.moving_variance)]
    frozen = np.array(cnn.get_layer("block_15_expand").kernel)
    tuned = np.array(cnn.get_layer("block_16_expand").kernel)
    compile_model(model, OmegaConf.create({"optimizer": "rmsprop", "learning_rate": 1e-2}), 2)
    x = np.random.default_rng(0).uniform(0, 255, (8, 32, 32, 3)).astype("float32")
    model.fit(x, np.array([0, 1] * 4), epochs=1, batch_size=8, verbose=0)
    after_stats = [np.array(v) for layer in bns for v in (layer.moving_mean, layer.moving_variance)]
    for a, b in zip(stats, after_stats, strict=True):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(frozen, np.array(cnn.get_layer("block_15_expand").kernel))
    assert not np.array_equal(tuned, np.array(cnn.get_layer("block_16_expand").kernel))


def test_three_classes_end_to_end(project, tmp_path, monkeypatch):
    """A 3-class folder data set through every stage: softmax head, 3-way predictions."""
    from xfer.data.images import synthetic_image

    rng = np.random.default_rng(0)
    for label, cls in enumerate(["blobs", "noise", "stripes"]):
        d = tmp_path / "photos" / cls
        d.mkdir(parents=True)
        for i in range(14):
            img = synthetic_image(min(label, 1), 40, rng) if label != 1 else \
                Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8))
            img.save(d / f"{i}.jpg")
    monkeypatch.setenv("XFER_PIPELINE_ID", "three-classes")
    cfg = load_params(["data=folder", f"data.url={tmp_path / 'photos'}", "split.train=8", "split.val=3",
                       "split.test=3", "backbone.weights=null", "backbone.image_size=32", "head.epochs=2",
                       "head.batch_size=8", "finetune.epochs=1", "finetune.batch_size=8", "head.class_weight=balanced",
                       "head.label_smoothing=0.1"])  # the smoothed sparse loss must survive head.keras
    for stage in ("download", "split", "featurize", "views", "trunk", "train_head", "finetune", "evaluate"):
        importlib.import_module(f"stages.{stage}").main(cfg)
    assert read_json("data/raw/classes.json") == ["blobs", "noise", "stripes"]
    import keras

    import xfer.nets.backbones  # noqa: F401 - registers custom layers

    model = keras.saving.load_model(str(project / "models/model.keras"))
    assert model.output_shape == (None, 3)
    assert read_json("reports/evaluate.json")["test_images"] == 9
    assert 0 <= read_json("reports/metrics/finetune.json")["val_accuracy"] <= 1


def test_a_whole_epoch_per_call_gives_the_same_head_and_the_bar_counts_every_step(tmp_path):
    """train_head's fit runs an epoch per call of the compiled step (steps_per_execution = batches per epoch): the
    same shuffles, dropout and updates as one batch per call (to float tolerance), the callbacks once per call, and
    the progress bar still reaching every step."""
    import keras

    from xfer.core.runtime import progress_bar
    from xfer.nets.models import fit_head

    rng = np.random.default_rng(0)
    x, xv = rng.normal(size=(100, 16)).astype("float32"), rng.normal(size=(30, 16)).astype("float32")
    y, yv = (x[:, :3].sum(1) > 0).astype("int32"), (xv[:, :3].sum(1) > 0).astype("int32")
    h = head_cfg(units=8, dropout=0.3, epochs=4, batch_size=16, patience=None, reduce_lr_patience=None)
    calls, runs = [], {}
    for spe in (1, 7):  # 100 rows / 16: 7 batches per epoch, the last one short
        keras.utils.set_random_seed(0)
        bar = progress_bar(f"spe {spe}")
        count = keras.callbacks.LambdaCallback(on_train_batch_end=lambda batch, logs, s=spe: calls.append(s))
        model, history = fit_head(x, y, xv, yv, h, 2, tmp_path / f"{spe}.weights.h5", [count, bar],
                                  steps_per_execution=spe)
        assert model.steps_per_execution == spe
        assert bar.bar.n == bar.bar.total == 4 * 7
        runs[spe] = (model.get_weights(), history.history)
    assert calls.count(1) == 4 * 7 and calls.count(7) == 4
    for a, b in zip(runs[1][0], runs[7][0], strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)
    for key in ("loss", "val_loss", "val_accuracy"):
        np.testing.assert_allclose(runs[1][1][key], runs[7][1][key], rtol=0, atol=1e-5)


def test_a_signal_stops_a_whole_epoch_fit_at_the_end_of_the_call(monkeypatch, tmp_path):
    """With several steps per call the progress bar's step boundary is the end of the call: a signal TensorFlow
    swallowed during the first epoch ends the fit there."""
    import signal

    import keras

    from xfer.core import signals
    from xfer.core.runtime import progress_bar
    from xfer.nets.models import fit_head

    monkeypatch.setattr(signals, "received", [])
    rng = np.random.default_rng(1)
    x = rng.normal(size=(64, 8)).astype("float32")
    y = (x[:, 0] > 0).astype("int32")
    h = head_cfg(units=4, epochs=50, batch_size=8, patience=None, reduce_lr_patience=None)
    epochs = []
    seen = keras.callbacks.LambdaCallback(on_train_batch_end=lambda batch, logs: signals.received.append(
        signal.SIGTERM), on_epoch_end=lambda epoch, logs: epochs.append(epoch))
    bar = progress_bar("signal")
    with pytest.raises(signals.Terminated):
        fit_head(x, y, x, y, h, 2, tmp_path / "b.weights.h5", [seen, bar], steps_per_execution=8)
    assert bar.bar.n == 8 and epochs == []  # one call: the first epoch's 8 steps, then stopped
    bar.on_train_end()

"""Several devices (runtime.strategy): the setting, XFER_CPU_DEVICES, and a tiny pipeline whose featurize,
train_head and finetune, mirrored over two logical CPU devices, give what they give on one device."""

from __future__ import annotations

import importlib
import io
import json
import os
import shutil
import subprocess
import sys
import zipfile

import numpy as np
import pytest

from tests.conftest import TINY, assert_features_close, tiny_project
from xfer import XferError
from xfer.core.distribute import CPU_DEVICES, check_loss_scaling, choose, split_cpu, strategy_for

# No random draws inside a replica (Keras gives every replica the same dropout/augmentation seeds), so that one
# device and two compute the same function: no dropout, and fine-tuning on cached trunk views (augmented once,
# by the trunk stage) instead of augmenting images every step. 8 + 8 training and 4 + 4 validation images: batches
# of 8 that split evenly over two replicas (the halves of an uneven last batch would weigh equally in the loss).
COMPARABLE = ["head.dropout=0", "finetune.trunk_views=1", "data.per_class=14", "split.train=8", "split.val=4",
              "split.test=2", "head.epochs=2",
              "backbone.feature_layer=block3_pool", "backbone.unfreeze_from=block3_conv3"]  # VGG16's first 3 blocks
# Mirrored sums each batch's gradients in two halves, then adds them: float32 rounding in another order, not
# bit-exact. Measured (2-core AVX2 CPU): features 1.4e-6 (of 7.7: 2e-7 relative), head and fine-tuned weights 6e-8,
# metrics (6 decimals) equal. The weight bound is ~20x that, and 10x below one fine-tuning step (RMSprop moves a
# weight by about its learning rate, 1e-5; the head's by 1e-3): a lost, doubled or unsplit step shows.
WEIGHTS_ATOL, METRICS_ATOL = 1e-6, 2e-6

STAGES = ("featurize", "trunk", "train_head", "finetune")  # trunk: the same views on both (not distributed)
LAUNCH = f"""
import importlib, sys
from xfer.core.config import load_params
from xfer.core.quiet import import_tensorflow
import_tensorflow()
cfg = load_params(sys.argv[1:])
for stage in {STAGES}:
    importlib.import_module("stages." + stage).main(cfg)
"""


@pytest.mark.parametrize("setting, gpus, expected", [
    ("auto", 0, "one"), ("auto", 1, "one"), ("auto", 2, "mirrored"),
    ("one", 4, "one"), ("mirrored", 0, "mirrored"), ("mirrored", 1, "mirrored"),
])
def test_choose(setting, gpus, expected):
    assert choose(setting, gpus) == expected


@pytest.mark.parametrize("bad", ["multi", "Mirrored", True, None, 2])
def test_bad_strategy_is_one_line(bad):
    with pytest.raises(XferError, match=r"^runtime\.strategy: .* is not one of auto, one, mirrored$"):
        strategy_for(bad)


def test_auto_and_one_without_gpus_are_the_default_strategy_and_mirrored_uses_the_cpus(monkeypatch):
    import tensorflow as tf

    monkeypatch.delenv(CPU_DEVICES, raising=False)
    assert not tf.config.list_logical_devices("GPU")
    for setting in ("auto", "one"):
        strategy = strategy_for(setting)
        assert strategy is tf.distribute.get_strategy() and strategy.num_replicas_in_sync == 1
    mirrored = strategy_for("mirrored")
    assert isinstance(mirrored, tf.distribute.MirroredStrategy)
    assert mirrored.num_replicas_in_sync == len(tf.config.list_logical_devices("CPU"))


def test_cpu_devices_variable_is_checked(monkeypatch):
    import tensorflow as tf

    n = len(tf.config.list_logical_devices("CPU"))  # starts TensorFlow's devices: too late to split them now
    monkeypatch.setenv(CPU_DEVICES, "two")
    with pytest.raises(XferError, match=rf"^{CPU_DEVICES}='two' is not a whole number >= 1"):
        split_cpu()
    monkeypatch.setenv(CPU_DEVICES, str(n + 1))
    with pytest.raises(XferError, match=rf"^{CPU_DEVICES}={n + 1}: TensorFlow had already set up its devices"):
        split_cpu()
    monkeypatch.setenv(CPU_DEVICES, str(n))
    split_cpu()  # what it already has: fine


def test_xla_across_cpu_devices_is_refused(monkeypatch):
    import tensorflow as tf

    cpus = [tf.config.LogicalDevice(f"/device:CPU:{i}", "CPU") for i in range(2)]
    monkeypatch.setattr(tf.config, "list_logical_devices", lambda kind=None: cpus if kind == "CPU" else [])
    with pytest.raises(XferError, match=r"^runtime\.jit=true: XLA cannot run runtime\.strategy=mirrored over 2 CPU"):
        strategy_for("mirrored", True)
    assert strategy_for("one", True).num_replicas_in_sync == 1


def test_float16_training_over_several_replicas_is_refused():
    """Keras's LossScaleOptimizer checks the first replica's gradients only: an overflow elsewhere -> NaN weights."""
    from types import SimpleNamespace

    import keras

    two, one = SimpleNamespace(num_replicas_in_sync=2), SimpleNamespace(num_replicas_in_sync=1)
    try:
        keras.mixed_precision.set_global_policy("mixed_float16")
        with pytest.raises(XferError, match=r"^runtime\.precision=float16 cannot train with runtime\.strategy="):
            check_loss_scaling(two)
        check_loss_scaling(one)
        keras.mixed_precision.set_global_policy("mixed_bfloat16")  # no loss scaling
        check_loss_scaling(two)
    finally:
        keras.mixed_precision.set_global_policy("float32")


def h5_layout(path) -> list[tuple[str, tuple]]:
    """Every dataset's name and shape in a .keras file's weights, in file order."""
    import h5py

    with zipfile.ZipFile(path) as z, h5py.File(io.BytesIO(z.read("model.weights.h5"))) as f:
        out = []
        f.visititems(lambda name, obj: out.append((name, getattr(obj, "shape", None))))
        return [*z.namelist(), *out]


def weights(path) -> dict[str, np.ndarray]:
    import h5py

    with zipfile.ZipFile(path) as z, h5py.File(io.BytesIO(z.read("model.weights.h5"))) as f:
        out = {}
        f.visititems(lambda name, obj: out.update({name: obj[()]} if hasattr(obj, "shape") else {}))
        return out


@pytest.fixture(scope="module")
def one_and_mirrored(tmp_path_factory):
    """The tiny pipeline's download and split, copied; then featurize, trunk, train_head and finetune on one
    device in this process while, at the same time, another process whose CPU is two logical devices
    (XFER_CPU_DEVICES=2) runs them with runtime.strategy=mirrored on the copy."""
    import mlflow

    folder = tmp_path_factory.mktemp("strategy")
    with tiny_project(folder / "one", ["download", "split"], "one", COMPARABLE) as (one, cfg):
        mirrored = folder / "mirrored"
        shutil.copytree(one, mirrored)
        env = {**os.environ, CPU_DEVICES: "2", "XFER_PIPELINE_ID": "mirrored",
               "MLFLOW_TRACKING_URI": f"sqlite:///{mirrored}/mlflow.db"}
        env.pop("DVC_ROOT", None)
        with open(folder / "mirrored.log", "w+") as log:
            launched = subprocess.Popen([sys.executable, "-c", LAUNCH, *TINY, *COMPARABLE, "runtime.strategy=mirrored"],
                                        cwd=mirrored, env=env, stdout=log, stderr=subprocess.STDOUT)
            try:
                for stage in STAGES:
                    importlib.import_module(f"stages.{stage}").main(cfg)
                assert launched.wait(timeout=300) == 0, (folder / "mirrored.log").read_text()[-3000:]
            finally:
                launched.kill()
    runs = {}
    for root in (one, mirrored):
        client = mlflow.MlflowClient(f"sqlite:///{root}/mlflow.db")
        found = client.search_runs([client.get_experiment_by_name("synthetic").experiment_id],
                                   "tags.role = 'stage'", order_by=["attributes.start_time DESC"])
        for run in found:  # the newest run of each stage
            runs.setdefault((root.name, run.data.tags["stage"]), run.data.params)
    return one, mirrored, runs


@pytest.mark.parametrize("stage", ["featurize", "train_head", "finetune"])
def test_stages_log_the_strategy_and_replicas(one_and_mirrored, stage):
    _, _, runs = one_and_mirrored
    assert runs[("one", stage)]["runtime.strategy"] == "auto"
    assert (runs[("one", stage)]["strategy_used"], runs[("one", stage)]["replicas"]) == ("one", "1")
    assert runs[("mirrored", stage)]["runtime.strategy"] == "mirrored"
    assert (runs[("mirrored", stage)]["strategy_used"], runs[("mirrored", stage)]["replicas"]) == ("mirrored", "2")


def test_mirrored_features_equal_one_devices(one_and_mirrored):
    """Each replica featurizes half of every batch (Keras alone would give both the whole batch: twice the rows)."""
    import h5py

    one, mirrored, _ = one_and_mirrored
    d = "data/features/vgg16"
    for split in ("train", "val", "test"):
        a, b = np.load(one / d / f"{split}_features.npy"), np.load(mirrored / d / f"{split}_features.npy")
        assert a.shape == b.shape
        assert_features_close(b, a)
        np.testing.assert_array_equal(np.load(one / d / f"{split}_labels.npy"),
                                      np.load(mirrored / d / f"{split}_labels.npy"))
    with h5py.File(one / d / "base.weights.h5") as fa, h5py.File(mirrored / d / "base.weights.h5") as fb:
        names = []
        fa.visititems(lambda name, obj: names.append(name) if hasattr(obj, "shape") else None)
        assert names
        for name in names:
            np.testing.assert_array_equal(fa[name][()], fb[name][()])


@pytest.mark.parametrize("model, metrics", [("head", "head"), ("model", "finetune")])
def test_mirrored_training_matches_one_device_within_rounding(one_and_mirrored, model, metrics):
    one, mirrored, _ = one_and_mirrored
    a, b = one / f"models/{model}.keras", mirrored / f"models/{model}.keras"
    assert h5_layout(a) == h5_layout(b)  # saved from under the strategy: the same file layout
    wa, wb = weights(a), weights(b)
    diffs = {name: float(np.max(np.abs(wa[name] - wb[name]), initial=0.0)) for name in wa}
    assert max(diffs.values()) < WEIGHTS_ATOL, diffs
    assert max(diffs.values()) > 0  # not bit-exact: the batches really were split over two replicas
    ma = json.loads((one / f"reports/metrics/{metrics}.json").read_text())
    mb = json.loads((mirrored / f"reports/metrics/{metrics}.json").read_text())
    assert ma.keys() == mb.keys() and ma
    for key in ma:
        assert abs(ma[key] - mb[key]) < METRICS_ATOL, (key, ma[key], mb[key])

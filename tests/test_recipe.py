"""The recipe's options: constructor kwargs, Keras-2 .h5 weights, augmented training views, label smoothing,
warm-up + cosine schedule, test-time augmentation."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
from omegaconf import OmegaConf

from tests.conftest import REPO, TINY, assert_features_close, tiny_project
from xfer import XferError
from xfer.core.files import read_json


def mobilenet_cfg(**overrides):
    cfg = OmegaConf.load(REPO / "conf/backbone/mobilenet.yaml")
    cfg.weights, cfg.image_size = None, 32
    return OmegaConf.merge(cfg, overrides)


def test_kwargs_reach_the_constructor_and_bad_ones_fail_in_one_line():
    from xfer.nets.backbones import backbone_cnn, build_base

    assert backbone_cnn(build_base(mobilenet_cfg())).count_params() == 218_544  # alpha 0.25, as Keras ships it
    wide = backbone_cnn(build_base(mobilenet_cfg(kwargs={"alpha": 0.5}))).count_params()
    assert wide > 218_544
    with pytest.raises(XferError) as err:
        build_base(mobilenet_cfg(kwargs={"alpha": 0.25, "minimalistic": True}))
    message = str(err.value)
    assert "\n" not in message and "backbone.kwargs.minimalistic" in message
    assert "accepted: alpha, depth_multiplier, dropout" in message


def write_keras2_h5(model, path) -> None:
    """Weights in the Keras 2 HDF5 layout Keras Applications publishes (layer_names / weight_names attributes)."""
    with h5py.File(path, "w") as f:
        layers = [layer for layer in model.layers if layer.weights]
        f.attrs["layer_names"] = [layer.name.encode() for layer in layers]
        f.attrs["backend"], f.attrs["keras_version"] = b"tensorflow", b"2.15.0"
        for layer in layers:
            g = f.create_group(layer.name)
            names = [f"{layer.name}/{w.name}:0".encode() for w in layer.weights]
            g.attrs["weight_names"] = names
            for name, w in zip(names, layer.weights, strict=True):
                g.create_dataset(name.decode(), data=np.asarray(w))


def test_keras2_h5_weights_load_and_reproduce_the_network(tmp_path):
    import keras

    from xfer.nets.backbones import backbone_cnn, build_base

    keras.utils.set_random_seed(1)
    source = build_base(mobilenet_cfg())
    path = tmp_path / "mobilenet_2_5_32_tf_no_top.h5"
    write_keras2_h5(backbone_cnn(source), path)
    keras.utils.set_random_seed(2)  # another random init, then the file's weights
    loaded = build_base(mobilenet_cfg(weights=str(path)))
    images = np.random.default_rng(0).uniform(0, 255, (4, 32, 32, 3)).astype("float32")
    assert_features_close(loaded.predict(images, verbose=0), source.predict(images, verbose=0))
    (tmp_path / "bad.h5").write_bytes(b"not hdf5")
    with pytest.raises(XferError, match="backbone.weights .*bad.h5 do not fit"):
        build_base(mobilenet_cfg(weights=str(tmp_path / "bad.h5")))


@pytest.fixture(scope="module")
def views_run(tmp_path_factory):
    stages = ["download", "split", "featurize"]
    with tiny_project(tmp_path_factory.mktemp("views") / "proj", stages, "views") as (root, _):
        from stages import train_head, views
        from xfer.core.config import load_params

        cfg = load_params([*TINY, "featurize.train_views=2"])
        views.main(cfg)
        train_head.main(cfg)
        yield root


def test_train_views_multiply_the_rows_and_keep_labels_aligned(views_run):
    root = views_run
    clean = np.load(root / "data/features/vgg16/train_features.npy")
    y = np.load(root / "data/features/vgg16/train_labels.npy")
    v = np.load(root / "data/views/vgg16/train_features.npy")
    yv = np.load(root / "data/views/vgg16/train_labels.npy")
    n = len(clean)
    assert v.shape == (2 * n, *clean.shape[1:]) and (yv == np.tile(y, 2)).all()
    paths = (root / "data/views/vgg16/train_paths.txt").read_text().splitlines()
    assert paths == (root / "data/features/vgg16/train_paths.txt").read_text().splitlines() * 2
    assert not np.allclose(v[:n], clean) and not np.allclose(v[:n], v[n:])  # augmented, and two distinct views
    assert read_json(root / "data/views/vgg16/meta.json") == {"backbone": "vgg16", "views": 2, "images": n,
                                                              "shape": list(clean.shape[1:]), "dtype": "float32"}
    import mlflow

    run = mlflow.MlflowClient(f"sqlite:///{root}/mlflow.db").get_run(
        read_json(root / "reports/runs/train_head.json")["run_id"])
    assert run.data.metrics["train_rows"] == 3 * n and run.data.metrics["train_views"] == 2


def test_no_views_is_an_empty_cache(views_run, monkeypatch):
    from stages import views
    from xfer.core.config import load_params

    monkeypatch.chdir(views_run)
    views.main(load_params([*TINY, "featurize.train_views=0"]))
    assert sorted(p.name for p in (views_run / "data/views/vgg16").iterdir()) == ["meta.json"]
    with pytest.raises(XferError, match="featurize.train_views: -1 is not a whole number"):
        views.main(load_params([*TINY, "featurize.train_views=-1"]))


def test_label_smoothing_and_cosine_warmup():
    import keras

    from xfer.nets.models import SparseSmoothedCrossentropy, learning_rate, loss_for

    assert loss_for(2, 0.1).get_config()["label_smoothing"] == pytest.approx(0.1)
    y, p = np.array([0, 2]), np.array([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]], dtype="float32")
    expected = keras.losses.CategoricalCrossentropy(label_smoothing=0.1)(np.eye(3)[y], p)
    assert float(SparseSmoothedCrossentropy(3, 0.1)(y, p)) == pytest.approx(float(expected), rel=1e-5)
    cfg = OmegaConf.create({"learning_rate": 1e-3, "schedule": "cosine", "warmup_epochs": 1, "epochs": 5})
    lr = learning_rate(cfg, steps_per_epoch=10)
    assert float(lr(0)) == pytest.approx(0.0, abs=1e-9)
    assert float(lr(10)) == pytest.approx(1e-3)  # end of warm-up: the peak
    assert float(lr(30)) == pytest.approx(5e-4, rel=1e-3)  # half-way through the cosine
    assert float(lr(50)) == pytest.approx(0.0, abs=1e-9)
    assert learning_rate(OmegaConf.create({"learning_rate": 1e-3})) == 1e-3
    with pytest.raises(XferError, match="schedule: 'step' is not one of constant, cosine"):
        learning_rate(OmegaConf.create({"learning_rate": 1e-3, "schedule": "step"}), 10)


def test_tta_averages_the_mirrored_predictions():
    import keras

    from xfer.nets.serving import Predictor, check_tta

    keras.utils.set_random_seed(0)
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Flatten()(inputs)  # position-dependent: a mirror changes the output
    model = keras.Model(inputs, keras.layers.Dense(1, activation="sigmoid")(x))
    batch = np.random.default_rng(0).uniform(0, 255, (5, 8, 8, 3)).astype("float32") / 255
    plain = Predictor(model, ["a", "b"]).probabilities(batch)
    mirrored = Predictor(model, ["a", "b"]).probabilities(batch[:, :, ::-1, :])
    assert not np.allclose(plain, mirrored)
    tta = Predictor(model, ["a", "b"], ["flip"]).probabilities(batch)
    np.testing.assert_allclose(tta, (plain + mirrored) / 2, atol=1e-6)
    with pytest.raises(ValueError, match="tta: 'rotate' is not one of flip"):
        check_tta(["rotate"])


def test_a_bad_evaluate_tta_is_one_line_naming_the_key():
    from omegaconf import OmegaConf

    from xfer import XferError
    from xfer.nets.serving import evaluate_tta

    assert evaluate_tta(OmegaConf.create({"evaluate": {"tta": ["flip"]}})) == ["flip"]
    with pytest.raises(XferError, match=r"^evaluate\.tta: 'rotate' is not one of flip"):
        evaluate_tta(OmegaConf.create({"evaluate": {"tta": ["rotate"]}}))

"""Backbone registry and feature caching: every backbone builds and featurizes; weights files round-trip;
pooling, float16 storage and row alignment."""

from __future__ import annotations

import numpy as np
import pytest
from omegaconf import OmegaConf
from PIL import Image

from tests.conftest import REPO, assert_features_close
from xfer import XferError
from xfer.core.config import choices

BACKBONES = choices("backbone", REPO)
# Smallest input each family accepts, to keep the test fast.
MIN_SIZE = {"xception": 71, "inceptionv3": 75}


def backbone_cfg(name: str, **overrides):
    cfg = OmegaConf.load(REPO / "conf" / "backbone" / f"{name}.yaml")
    cfg.weights = None
    cfg.image_size = MIN_SIZE.get(name, 32)
    return OmegaConf.merge(cfg, overrides)


def test_registry_has_the_eight_backbones():
    assert set(BACKBONES) >= {"vgg16", "vgg19", "resnet50v2", "xception", "inceptionv3", "mobilenetv2",
                              "efficientnetv2b0", "mobilenet"}


@pytest.mark.parametrize("name", BACKBONES)
def test_backbone_builds_featurizes_and_has_its_boundary(name):
    import keras

    from xfer.nets.backbones import backbone_cnn, build_base, unfreeze_from

    cfg = backbone_cfg(name)
    base = build_base(cfg)
    size = cfg.image_size
    images = np.random.default_rng(0).uniform(0, 255, (2, size, size, 3)).astype("float32")
    feats = base.predict(images, verbose=0)
    assert feats.shape[0] == 2 and feats.ndim == 4 and np.isfinite(feats).all()
    assert feats.shape[1:] == base.output_shape[1:]
    cnn = backbone_cnn(base)
    assert unfreeze_from(cnn, cfg.unfreeze_from) >= 1
    pooled_base = build_base(cfg, pooling="avg")
    pooled = pooled_base.predict(images, verbose=0)
    assert pooled.shape == (2, feats.shape[-1])
    # Grad-CAM reads this backbone's last feature map, inside the pooled base.
    from xfer.nets.gradcam import heatmaps, last_feature_map

    inputs = keras.Input((size, size, 3))
    classifier = keras.Model(inputs, keras.layers.Dense(1, activation="sigmoid")(pooled_base(inputs)))
    assert last_feature_map(classifier) == f"base_{name}/{cnn.name}"
    cams = heatmaps(classifier, images)
    assert cams.shape == (2, size, size) and cams.min() >= 0 and cams.max() <= 1
    keras.backend.clear_session()


def test_weights_file_reproduces_features_exactly(tmp_path):
    import keras

    from xfer.nets.backbones import backbone_cnn, build_base

    keras.utils.set_random_seed(1)
    first = build_base(backbone_cfg("mobilenetv2"))
    path = tmp_path / "mobilenet.weights.h5"
    backbone_cnn(first).save_weights(str(path))
    keras.utils.set_random_seed(2)  # a different random init, then the file's weights
    second = build_base(backbone_cfg("mobilenetv2", weights=str(path)))
    images = np.random.default_rng(0).uniform(0, 255, (3, 32, 32, 3)).astype("float32")
    assert_features_close(second.predict(images, verbose=0), first.predict(images, verbose=0))
    third = build_base(backbone_cfg("mobilenetv2"))
    with pytest.raises(AssertionError):  # other weights: far outside float32 noise
        assert_features_close(third.predict(images, verbose=0), first.predict(images, verbose=0))


def test_bad_weights_and_layers_are_one_line_errors(tmp_path):
    from xfer.nets.backbones import build_base

    with pytest.raises(XferError, match="file .*missing.weights.h5 not found"):
        build_base(backbone_cfg("vgg16", weights=str(tmp_path / "missing.weights.h5")))
    with pytest.raises(XferError, match="has no layer 'block9_pool'"):
        build_base(backbone_cfg("vgg16", feature_layer="block9_pool"))


def test_imagenet_offline_names_the_file():
    from xfer.nets.backbones import build_base

    with pytest.raises(XferError, match=r"could not download vgg16_weights_tf_dim_ordering_tf_kernels_notop\.h5.*"
                                        r"~/.keras/models/.*backbone.weights="):
        build_base(backbone_cfg("vgg16", weights="imagenet"))


def test_feature_layer_cuts_the_base_earlier():
    from xfer.nets.backbones import build_base

    base = build_base(backbone_cfg("vgg16", feature_layer="block4_pool", image_size=64))
    assert base.output_shape == (None, 4, 4, 512)


def write_images(folder, n):
    paths = []
    for i in range(n):
        p = folder / f"{i}.jpg"
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(p)
        paths.append(str(p))
    return paths


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_featurize_rows_follow_the_manifest_order(tmp_path, dtype):
    """Shuffling the manifest shuffles the feature rows with it: row i always belongs to path i."""
    from xfer.nets.backbones import build_base
    from xfer.nets.features import featurize_split

    base = build_base(backbone_cfg("vgg16"), pooling="max")
    paths = write_images(tmp_path, 7)
    labels = np.arange(7) % 2
    order = np.random.default_rng(3).permutation(7)
    featurize_split(base, paths, labels, tmp_path, "a", 3, dtype)
    featurize_split(base, [paths[i] for i in order], labels[order], tmp_path, "b", 3, dtype)
    fa = np.load(tmp_path / "a_features.npy", allow_pickle=False)
    fb = np.load(tmp_path / "b_features.npy", allow_pickle=False)
    assert fa.dtype == np.dtype(dtype) and fa.shape == (7, 512)
    assert_features_close(fb, fa[order], dtype)  # batches of 3 composed differently: float32 noise only
    with pytest.raises(AssertionError):  # rows out of order would be far outside it
        assert_features_close(fb, fa, dtype)
    assert (np.load(tmp_path / "b_labels.npy", allow_pickle=False) == labels[order]).all()
    assert (tmp_path / "b_paths.txt").read_text().splitlines() == [paths[i] for i in order]

"""xfer.nets.boundary: the trunk/top cut at backbone.unfreeze_from, and fine-tuning's validation through the top."""

from __future__ import annotations

import numpy as np
from omegaconf import OmegaConf

from tests.conftest import assert_features_close


def bcfg(constructor: str, module: str, **kwargs):
    return OmegaConf.create({"name": "b", "constructor": constructor, "module": module, "weights": None,
                             "kwargs": kwargs, "image_size": 32, "feature_layer": None})


def test_top_of_trunk_is_the_base_and_shares_its_weights(project):
    from xfer.nets.backbones import backbone_cnn, build_base
    from xfer.nets.boundary import split_base

    base = build_base(bcfg("MobileNet", "mobilenet", alpha=0.25), pooling="avg")
    trunk, top = split_base(base, "conv_dw_12")
    images = np.random.default_rng(0).uniform(0, 255, (5, 32, 32, 3)).astype("float32")
    assert trunk.output_shape[1:] == backbone_cnn(base).get_layer("conv_dw_12").input.shape[1:]
    assert_features_close(top.predict(trunk.predict(images, verbose=0), verbose=0), base.predict(images, verbose=0))
    layer = backbone_cnn(base).get_layer("conv_pw_13")
    assert any(w is layer.kernel for w in top.weights)  # shared: training the base moves the top
    assert not any(w is layer.kernel for w in trunk.weights)


def test_a_boundary_that_a_residual_connection_bypasses_is_not_cut(project):
    from xfer.nets.backbones import build_base
    from xfer.nets.boundary import split_base

    base = build_base(bcfg("ResNet50V2", "resnet_v2"))
    assert split_base(base, "conv5_block2_1_conv") is None  # inside a block: the shortcut skips it
    assert split_base(base, "conv5_block1_preact_bn") is not None  # a block's input: one tensor

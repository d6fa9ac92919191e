"""The from-scratch baselines: each model has the book's layer types and trains; scratch=none costs nothing."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from xfer import XferError
from xfer.core.config import compose_conf


def layer_types(model) -> Counter:
    return Counter(type(layer).__name__ for layer in model.layers)


def test_convnet_is_the_books_small_convnet(project):
    from xfer.nets.scratch import build_scratch

    plain = build_scratch(compose_conf(["scratch=convnet"]).scratch, 2, seed=0)
    kinds = layer_types(plain)
    assert kinds["Conv2D"] == 5 and kinds["MaxPooling2D"] == 4 and kinds["Flatten"] == 1
    assert kinds["Dropout"] == 0 and "Sequential" not in kinds and kinds["Rescaling"] == 1
    assert [layer.filters for layer in plain.layers if type(layer).__name__ == "Conv2D"] == [32, 64, 128, 256, 256]
    assert plain.input_shape == (None, 180, 180, 3) and plain.output_shape == (None, 1)
    augmented = build_scratch(compose_conf(["scratch=convnet_augmented"]).scratch, 3, seed=0)
    kinds = layer_types(augmented)
    assert kinds["Dropout"] == 1 and kinds["Conv2D"] == 5 and augmented.output_shape == (None, 3)
    augment = augmented.get_layer("augment")
    assert [type(layer).__name__ for layer in augment.layers] == ["RandomFlip", "RandomRotation", "RandomZoom"]
    cfg = compose_conf(["scratch=convnet", "scratch.image_size=64"]).scratch
    with pytest.raises(XferError, match="scratch.image_size: 64 px is too small for convnet"):
        build_scratch(cfg, 2, seed=0)


def test_xception_mini_has_residual_blocks_of_batchnorm_and_separable_convolutions_and_trains(project):
    import keras

    from xfer.nets.models import compile_model
    from xfer.nets.scratch import build_scratch

    cfg = compose_conf(["scratch=xception_mini", "scratch.image_size=32", "scratch.filters=[8,16,32]",
                        "scratch.learning_rate=0.01"]).scratch
    model = build_scratch(cfg, 2, seed=0)
    kinds = layer_types(model)
    assert kinds["Add"] == 3 and kinds["BatchNormalization"] == 6 and kinds["SeparableConv2D"] == 6
    assert kinds["GlobalAveragePooling2D"] == 1 and kinds["Dropout"] == 1 and "Flatten" not in kinds
    assert {layer.momentum for layer in model.layers if type(layer).__name__ == "BatchNormalization"} == {0.9}
    for i in (1, 2, 3):  # each block adds its strided 1x1 projection of its input: a residual connection
        add = model.get_layer(f"block{i}_add")
        assert {t._keras_history.operation.name for t in add._inbound_nodes[0].input_tensors} == \
            {f"block{i}_pool", f"block{i}_project"}
    assert build_scratch(compose_conf(["scratch=xception_mini"]).scratch, 2, 0).count_params() > 700_000  # book's
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 255, (32, 32, 32, 3)).astype("float32")
    y = (x[:, :16].mean(axis=(1, 2, 3)) > x[:, 16:].mean(axis=(1, 2, 3))).astype(int)
    compile_model(model, cfg, 2, steps_per_epoch=4)
    before = [w.copy() for w in model.get_weights()]
    history = model.fit(x, y, batch_size=8, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][0])
    assert any(not np.array_equal(a, b) for a, b in zip(before, model.get_weights(), strict=True))


def test_unknown_model_is_refused_in_one_line(project):
    from xfer.nets.scratch import build_scratch

    cfg = compose_conf(["scratch=convnet", "scratch.model=resnet"]).scratch
    with pytest.raises(XferError, match="scratch.model: 'resnet' is not one of convnet, xception_mini"):
        build_scratch(cfg, 2, seed=0)


def test_scratch_none_writes_empty_outputs_and_logs_nothing(project, tmp_path, monkeypatch):
    from stages import scratch
    from xfer.core.config import load_params
    from xfer.core.files import read_json

    monkeypatch.chdir(tmp_path)
    for stale in ("models/scratch/old.keras", "reports/scratch/old.png"):
        (tmp_path / stale).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / stale).write_text("stale")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/never.db")
    scratch.main(load_params(["scratch=none"], root=project))
    assert not any((tmp_path / "models/scratch").iterdir()) and not any((tmp_path / "reports/scratch").iterdir())
    assert read_json(tmp_path / "reports/metrics/scratch.json") == {}
    assert read_json(tmp_path / "reports/runs/scratch.json")["run_id"] is None
    assert (tmp_path / "reports/plots/scratch.csv").read_text().startswith("epoch,")
    assert not (tmp_path / "never.db").exists()  # no MLflow run for a baseline that was not asked for

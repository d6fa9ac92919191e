"""finetune.trunk_views: the trunk stage caches augmented views at the boundary; fine-tuning trains on them."""

from __future__ import annotations

import numpy as np
import pytest

from tests.conftest import TINY, tiny_project
from xfer import XferError
from xfer.core.files import read_json


def test_view_batches_take_one_view_per_image_per_epoch():
    from xfer.nets.views import view_batches

    n, k = 5, 3
    x = np.array([[v * 100 + i] for v in range(k) for i in range(n)], dtype=np.float16)  # row v * n + i
    y = np.tile(np.arange(n), k)
    batches = view_batches(x, y, k, batch_size=2, seed=0)
    assert len(batches) == 3
    for epoch in range(4):
        rows = [batches[i] for i in range(len(batches))]
        xs = np.concatenate([r[0][:, 0] for r in rows]).astype(int)
        ys = np.concatenate([r[1] for r in rows])
        assert sorted(xs % 100) == list(range(n)) and set(xs // 100) == {epoch % k}  # every image once, one view
        assert (xs % 100 == ys).all() and rows[0][0].dtype == np.float32
        batches.on_epoch_end()
    with pytest.raises(XferError, match="do not make 3 views"):
        view_batches(x[:-1], y[:-1], k, 2, 0)


@pytest.fixture(scope="module")
def trunk_run(tmp_path_factory):
    with tiny_project(tmp_path_factory.mktemp("trunk") / "proj", ["download", "split", "featurize"], "trunk") \
            as (root, _):
        from stages import finetune, train_head, trunk, views
        from xfer.core.config import load_params

        cfg = load_params([*TINY, "finetune.trunk_views=2", "finetune.epochs=2"])
        for stage in (views, trunk, train_head, finetune):
            stage.main(cfg)
        yield root, cfg


def test_trunk_views_are_cached_at_the_boundary_with_aligned_labels(trunk_run):
    root, _ = trunk_run
    y = np.load(root / "data/features/vgg16/train_labels.npy")
    v = np.load(root / "data/trunk/vgg16/train_features.npy")
    n = len(y)
    assert v.dtype == np.float16 and v.shape == (2 * n, 2, 2, 512)  # entering block5_conv1 at 32 px
    assert (np.load(root / "data/trunk/vgg16/train_labels.npy") == np.tile(y, 2)).all()
    assert not np.allclose(v[:n], v[n:])  # two distinct augmented views
    assert read_json(root / "data/trunk/vgg16/meta.json") == {
        "backbone": "vgg16", "boundary": "block5_conv1", "views": 2, "images": n, "shape": [2, 2, 512],
        "dtype": "float16"}


def test_finetuning_on_trunk_views_trains_the_image_model(trunk_run):
    import keras
    import mlflow

    from xfer.data.images import image_dataset
    from xfer.data.paths import image_paths, read_manifest

    root, cfg = trunk_run
    run = mlflow.MlflowClient(f"sqlite:///{root}/mlflow.db").get_run(
        read_json(root / "reports/runs/finetune.json")["run_id"])
    assert run.data.metrics["trained_on_trunk_views"] == 1 and run.data.metrics["stopped_epoch"] == 2
    model = keras.saving.load_model(str(root / "models/model.keras"))
    head = keras.saving.load_model(str(root / "models/head.keras"))
    x_val = np.load(root / "data/features/vgg16/val_features.npy")
    moved = np.abs(model.get_layer("head").predict(x_val, verbose=0) - head.predict(x_val, verbose=0)).max()
    assert moved > 0  # the head in the saved image model was trained further
    val = read_manifest("val")
    ds = image_dataset(image_paths(val), val["label"].to_numpy(), int(cfg.backbone.image_size), 8)
    whole = model.evaluate(ds, verbose=0, return_dict=True)
    logged = read_json(root / "reports/metrics/finetune.json")
    assert logged["val_loss"] == pytest.approx(whole["loss"], abs=1e-4)


def test_a_boundary_that_cannot_be_cut_falls_back_to_images(trunk_run, monkeypatch, capsys):
    """(e.g. InceptionV3's mixed9, a multi-branch block) the default trunk_views must not break such a backbone."""
    import mlflow

    import xfer.nets.boundary
    from stages import finetune, trunk
    from xfer.core.config import load_params

    root, _ = trunk_run
    monkeypatch.setattr(xfer.nets.boundary, "split_base", lambda base, boundary: None)
    cfg = load_params([*TINY, "finetune.trunk_views=1"])
    trunk.main(cfg)
    assert read_json(root / "data/trunk/vgg16/meta.json")["views"] == 0
    assert "cannot be cached" in capsys.readouterr().err
    finetune.main(cfg)
    run = mlflow.MlflowClient(f"sqlite:///{root}/mlflow.db").get_run(
        read_json(root / "reports/runs/finetune.json")["run_id"])
    assert run.data.metrics["trained_on_trunk_views"] == 0 and run.data.metrics["validation_at_boundary"] == 0


def test_finetune_refuses_stale_trunk_views(trunk_run):
    from stages import finetune
    from xfer.core.config import load_params

    with pytest.raises(XferError, match=r"data/trunk/vgg16: no cached trunk views .*run the trunk stage"):
        finetune.main(load_params([*TINY, "finetune.trunk_views=3"]))


def test_without_fine_tuning_the_trunk_stage_caches_nothing(trunk_run, capsys):
    """(Last: it empties the module's trunk cache.) finetune.enabled=false: no views, whatever trunk_views says."""
    from stages import trunk
    from xfer.core.config import load_params

    root, _ = trunk_run
    trunk.main(load_params([*TINY, "finetune.trunk_views=2", "finetune.enabled=false"]))
    assert read_json(root / "data/trunk/vgg16/meta.json")["views"] == 0
    assert not (root / "data/trunk/vgg16/train_features.npy").exists()
    assert "finetune.enabled is false" in capsys.readouterr().out

"""Grad-CAM: heatmaps have the image's size and lie in [0, 1]; on a convnet trained on images whose class signal
sits in one known region, most of the heatmap's mass falls inside that region."""

from __future__ import annotations

import numpy as np
import pytest

SIZE = 32


def signal_images(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Noise images; class 1 also has a bright 8x8 square somewhere inside the top-left 16x16 quadrant."""
    rng = np.random.default_rng(seed)
    x = rng.uniform(0, 80, (n, SIZE, SIZE, 3)).astype("float32")
    y = np.arange(n) % 2
    for i in np.flatnonzero(y):
        r, c = rng.integers(0, 9, 2)
        x[i, r : r + 8, c : c + 8] = 255.0
    return x, y


def small_convnet():
    import keras

    inputs = keras.Input((SIZE, SIZE, 3))
    x = keras.layers.Rescaling(1 / 255)(inputs)
    x = keras.layers.Conv2D(8, 3, padding="same", activation="relu")(x)
    x = keras.layers.MaxPooling2D()(x)
    x = keras.layers.Conv2D(16, 3, padding="same", activation="relu", name="last_conv")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, keras.layers.Dense(1, activation="sigmoid")(x))


def test_last_feature_map_is_the_last_4d_layer_even_inside_a_nested_backbone():
    import keras

    from xfer.nets.gradcam import heatmaps, last_feature_map

    assert last_feature_map(small_convnet()) == "last_conv"
    base = keras.Sequential([keras.Input((SIZE, SIZE, 3)), keras.layers.Conv2D(4, 3, activation="relu")],
                            name="base")
    inputs = keras.Input((SIZE, SIZE, 3))
    x = keras.layers.GlobalAveragePooling2D()(base(inputs))
    model = keras.Model(inputs, keras.layers.Dense(3, activation="softmax")(x))
    assert last_feature_map(model) == "base"
    images, _ = signal_images(4, seed=1)
    cams = heatmaps(model, images)
    assert cams.shape == (4, SIZE, SIZE) and cams.min() >= 0 and cams.max() <= 1
    flat = keras.Sequential([keras.Input((8,)), keras.layers.Dense(1)])
    with pytest.raises(ValueError, match="no layer with a 4-D"):
        last_feature_map(flat)


def test_heatmap_mass_falls_on_the_class_signal():
    import keras

    from xfer.nets.gradcam import heatmaps, overlay

    keras.utils.set_random_seed(0)
    x, y = signal_images(512, seed=0)
    model = small_convnet()
    model.compile(optimizer=keras.optimizers.Adam(3e-3), loss="binary_crossentropy", metrics=["accuracy"])
    model.fit(x, y, epochs=8, batch_size=32, verbose=0)
    x_test, y_test = signal_images(64, seed=1)
    assert model.evaluate(x_test, y_test, verbose=0)[1] > 0.9  # it did learn the square
    positives = x_test[y_test == 1]
    cams = heatmaps(model, positives, classes=np.ones(len(positives), dtype=int))
    assert cams.shape == (len(positives), SIZE, SIZE) and cams.min() >= 0 and cams.max() <= 1
    inside = cams[:, : SIZE // 2, : SIZE // 2].sum() / cams.sum()
    assert inside > 0.5, inside  # the quadrant is a quarter of the image
    blended = overlay(positives[0], cams[0])
    assert blended.shape == (SIZE, SIZE, 3) and blended.dtype == np.uint8


def test_the_pipeline_classifier_is_cut_inside_its_base_even_when_featurize_pools(project):
    """augmentation -> base (VGG16 + global average pooling inside) -> head: Grad-CAM reads VGG16's last feature
    map, and front then back is the whole model."""
    import keras

    from xfer.core.config import load_params
    from xfer.nets.backbones import build_base
    from xfer.nets.gradcam import heatmaps, last_feature_map, split_model
    from xfer.nets.models import augmentation, build_head

    cfg = load_params(["backbone.weights=null", "backbone.image_size=64"])
    for pooling in ("avg", None):
        base = build_base(cfg.backbone, pooling=pooling)
        head = build_head(base.output_shape[1:], 2, cfg.head)
        inputs = keras.Input((64, 64, 3))
        model = keras.Model(inputs, head(base(augmentation(cfg.finetune.augment, 0)(inputs), training=False)))
        assert last_feature_map(model) == ("base_vgg16/vgg16" if pooling else "base_vgg16")
        front, back = split_model(model)
        x = np.random.default_rng(0).uniform(0, 255, (3, 64, 64, 3)).astype("float32")
        assert front(x).shape == (3, 2, 2, 512)
        np.testing.assert_allclose(back(front(x, training=False), training=False), model(x, training=False),
                                   atol=1e-5)
        cams = heatmaps(model, x)
        assert cams.shape == (3, 64, 64) and cams.min() >= 0 and cams.max() <= 1


def test_the_grid_puts_each_image_beside_its_overlay_under_its_title(tmp_path):
    from PIL import Image

    from xfer.track.figures import GRID_TILE, explained_grid

    colors = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255]], dtype=np.float32)
    images = np.broadcast_to(colors[:, None, None, :], (3, 32, 32, 3))
    overlays = [np.full((32, 32, 3), 128, np.uint8)] * 3
    out = tmp_path / "grid.png"
    explained_grid(images, overlays, ["true cat\npred dog (0.93)"] * 3, out, "none")
    grid = np.asarray(Image.open(out).convert("RGB"))
    tile, head = GRID_TILE, 34
    assert grid.shape == (2 * (tile + head + 8) + 8, 4 * (tile + 8) + 8, 3)  # 3 examples: 2 rows of 2
    centre = lambda row, col: grid[8 + row * (tile + head + 8) + head + tile // 2, 8 + col * (tile + 8) + tile // 2]  # noqa: E731
    assert list(centre(0, 0)) == [255, 0, 0] and list(centre(0, 1)) == [128] * 3
    assert list(centre(0, 2)) == [0, 255, 0] and list(centre(1, 0)) == [0, 0, 255]
    assert (grid[8 : 8 + head - 2, 8 : 8 + tile] < 128).any()  # the title is drawn above the image
    explained_grid(np.zeros((0, 32, 32, 3)), [], [], tmp_path / "empty.png", "no misclassified test images")
    assert (np.asarray(Image.open(tmp_path / "empty.png").convert("L")) < 128).any()
    first = out.read_bytes()
    explained_grid(images, overlays, ["true cat\npred dog (0.93)"] * 3, out, "none")
    assert out.read_bytes() == first


def test_both_grids_come_from_one_gradient_pass_with_each_images_own_heatmap(tmp_path, monkeypatch):
    """explain_images: the misclassified and the correct images go through Grad-CAM together (one call), and each
    grid shows the heatmap that image gets on its own."""
    import keras
    from PIL import Image

    from xfer.nets import gradcam

    keras.utils.set_random_seed(0)
    model = small_convnet()
    x, y = signal_images(10, seed=3)
    paths = []
    for i, img in enumerate(x):
        paths.append(str(tmp_path / f"{i}.png"))
        Image.fromarray(img.astype(np.uint8)).save(paths[-1])
    p1 = np.linspace(0.05, 0.95, 10)
    probs = np.stack([1 - p1, p1], axis=1)
    calls, real = [], gradcam.heatmaps
    monkeypatch.setattr(gradcam, "heatmaps", lambda *a, **k: calls.append(len(a[1])) or real(*a, **k))
    drawn = {}

    def grid(images, overlays, titles, out, empty):
        drawn[len(drawn)] = (images, overlays)
        out.write_bytes(b"png")

    monkeypatch.setattr("xfer.track.figures.explained_grid", grid)
    assert gradcam.explain_images(model, paths, y, probs, ["a", "b"], 3, 2, tmp_path / "w.png", tmp_path / "r.png"
                                  ) == (3, 4)
    assert calls == [7]  # 3 wrong + 2 right per class, one pass
    wrong, right = gradcam.pick(y, probs, 3, 2)
    for k, chosen in enumerate((wrong, right)):
        images, overlays = drawn[k]
        assert len(images) == len(overlays) == len(chosen)
        alone = real(model, images, probs.argmax(1)[chosen])
        for im, cam, got in zip(images, alone, overlays, strict=True):
            assert np.abs(gradcam.overlay(im, cam).astype(int) - got.astype(int)).max() <= 1


def test_the_photo_grids_are_written_with_fast_png_compression(tmp_path):
    """zlib level 1 (FLEVEL 0 in the zlib header of the PNG's image data): the same pixels, written ~5x faster."""
    from PIL import Image

    from xfer.track.figures import explained_grid

    rng = np.random.default_rng(0)
    images = rng.uniform(0, 255, (2, 64, 64, 3)).astype(np.float32)
    out = tmp_path / "grid.png"
    explained_grid(images, [im.astype(np.uint8) for im in images], ["a", "b"], out, "none")
    data = out.read_bytes()
    idat = data.index(b"IDAT") + 4
    assert data[idat] & 0x0F == 8 and data[idat + 1] >> 6 == 0  # deflate, fastest level
    again = tmp_path / "default.png"
    Image.open(out).save(again, format="png")
    assert np.array_equal(np.asarray(Image.open(again)), np.asarray(Image.open(out)))

"""Class-activation heatmaps (Grad-CAM, Selvaraju et al. 2017; Chollet ch. 9): where the last convolutional
feature map of an image model looks when it predicts a class.

Works for the pipeline's image models: the classifier (augmentation -> base -> head, the base a nested model whose
output is the backbone's last feature map, or a vector when featurize pools it inside) and the from-scratch
convnets. The model is split after its last layer with a 4-D output (batch, height, width, channels), looking
inside a nested model whose own output is not 4-D; the gradient of the class score is taken with respect to that
feature map, its channels are weighted by their mean gradient, and the ReLU of the sum is the heatmap, resized to
the image and scaled to [0, 1].
"""

from __future__ import annotations

import numpy as np


def _is_4d(layer) -> bool:
    output = getattr(layer, "output", None)
    return output is not None and len(output.shape) == 4


def _cut(model) -> tuple[int, object | None]:
    """(index of the top-level layer to cut at, the nested model to cut inside it, or None to cut after it)."""
    import keras

    for i in range(len(model.layers) - 1, 0, -1):
        layer = model.layers[i]
        if isinstance(layer, keras.Model) and not _is_4d(layer) and any(map(_is_4d, layer.layers[1:])):
            return i, layer
        if _is_4d(layer):
            return i, None
    raise ValueError(f"model '{model.name}' has no layer with a 4-D (image-like) output")


def last_feature_map(model) -> str:
    """Name of the layer whose output Grad-CAM reads (``nested/inner`` inside a nested model)."""
    i, nested = _cut(model)
    return model.layers[i].name if nested is None else f"{nested.name}/{last_feature_map(nested)}"


def split_model(model):
    """(front, back): ``front(images)`` is the last feature map, ``back(feature_map)`` the model's output from it.
    Flat functional models are cut at the tensor; a nested model is cut inside when its output is pooled (the
    layers around it must form a chain, as in the pipeline's models)."""
    import keras

    i, nested = _cut(model)
    layer = model.layers[i]
    if not isinstance(layer, keras.Model):  # a tensor of this graph: cut there if everything after goes through it
        try:
            return (keras.Model(model.inputs, layer.output, name="front"),
                    keras.Model(layer.output, model.outputs[0], name="back"))
        except ValueError:
            pass
    inputs = keras.Input(model.input_shape[1:])
    x = inputs
    for layer in model.layers[1:i]:
        x = layer(x)
    if nested is None:
        fmap = model.layers[i](x)
        rest = model.layers[i + 1 :]
    else:
        inner_front, inner_back = split_model(nested)
        fmap, rest = inner_front(x), [inner_back, *model.layers[i + 1 :]]
    fmap_in = keras.Input(tuple(fmap.shape[1:]))
    y = fmap_in
    for layer in rest:
        y = layer(y)
    return keras.Model(inputs, fmap, name="front"), keras.Model(fmap_in, y, name="back")


def heatmaps(model, images: np.ndarray, classes: np.ndarray | None = None, parts=None) -> np.ndarray:
    """Grad-CAM of each image for class ``classes[i]`` (default: the predicted class), shape (n, height, width)
    of the images, values in [0, 1] (all zero where the gradient gives no positive evidence). ``parts``: a
    :func:`split_model` result to reuse across batches."""
    import tensorflow as tf

    front, back = parts or split_model(model)
    x = tf.convert_to_tensor(np.asarray(images, dtype=np.float32))
    with tf.GradientTape() as tape:
        fmap = front(x, training=False)
        tape.watch(fmap)
        probs = tf.cast(back(fmap, training=False), tf.float32)
        if probs.shape[-1] == 1:  # one sigmoid unit: class 1 is p, class 0 is 1 - p
            probs = tf.concat([1.0 - probs, probs], axis=-1)
        chosen = tf.argmax(probs, axis=-1) if classes is None else tf.constant(np.asarray(classes), tf.int64)
        score = tf.gather(probs, chosen, axis=1, batch_dims=1)
    grads = tf.cast(tape.gradient(score, fmap), tf.float32)
    weights = tf.reduce_mean(grads, axis=(1, 2), keepdims=True)
    cam = tf.nn.relu(tf.reduce_sum(weights * tf.cast(fmap, tf.float32), axis=-1))[..., None]
    cam = tf.image.resize(cam, tuple(x.shape[1:3]), method="bilinear")[..., 0]
    peak = tf.reduce_max(cam, axis=(1, 2), keepdims=True)
    return (cam / tf.where(peak > 0, peak, 1.0)).numpy()


def overlay(image: np.ndarray, heatmap: np.ndarray, alpha: float = 0.4) -> np.ndarray:
    """The image (HxWx3, 0-255) with the heatmap in the jet colormap blended over it, uint8."""
    import matplotlib

    colors = matplotlib.colormaps["jet"](np.clip(heatmap, 0, 1))[..., :3] * 255
    return np.clip((1 - alpha) * np.asarray(image, dtype=np.float32) + alpha * colors, 0, 255).astype(np.uint8)


def pick(y: np.ndarray, probs: np.ndarray, n_wrong: int, n_right_per_class: int) -> tuple[list[int], list[int]]:
    """The ``n_wrong`` most confidently misclassified images, and the ``n_right_per_class`` most confidently
    correct images of each class (class by class)."""
    pred, conf = probs.argmax(axis=1), probs.max(axis=1)
    order = np.argsort(-conf, kind="stable")
    wrong = [int(i) for i in order if pred[i] != y[i]][:n_wrong]
    right = [int(i) for c in range(probs.shape[1]) for i in [j for j in order if pred[j] == y[j] == c]
             [:n_right_per_class]]
    return wrong, right


def explain_images(model, paths: list[str], y: np.ndarray, probs: np.ndarray, classes: list[str],
                   n_wrong: int, n_right_per_class: int, wrong_png, right_png) -> tuple[int, int]:
    """Save the grids of misclassified and of correctly classified images (see :func:`pick`), each image beside
    its Grad-CAM overlay for the predicted class, titled with the true and predicted class and probability;
    return how many images each grid shows."""
    from xfer.core.files import atomic_path
    from xfer.data.images import load_resized
    from xfer.track.figures import explained_grid

    size = int(model.input_shape[1])
    wrong, right = pick(y, probs, n_wrong, n_right_per_class)
    pred, conf = probs.argmax(axis=1), probs.max(axis=1)
    both = wrong + right  # one gradient pass for both grids (each first call of a batch shape sets up its kernels)
    images = np.stack([load_resized(paths[i], size) for i in both]) if both else np.zeros((0, size, size, 3))
    cams = heatmaps(model, images, pred[both]) if both else images[..., 0]
    for k, (chosen, out, empty) in enumerate(((wrong, wrong_png, "no misclassified test images"),
                                              (right, right_png, "no correctly classified test images"))):
        rows = slice(0, len(wrong)) if k == 0 else slice(len(wrong), len(both))
        titles = [f"true {classes[y[i]]}\npred {classes[pred[i]]} ({conf[i]:.2f})" for i in chosen]
        with atomic_path(out) as tmp:
            explained_grid(images[rows], [overlay(im, cam) for im, cam in zip(images[rows], cams[rows], strict=True)],
                           titles, tmp, empty)
    return len(wrong), len(right)

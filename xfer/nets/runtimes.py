"""Runtimes for the exported files: each format run by its own runtime (``tf.saved_model.load``,
``ai_edge_litert.interpreter.Interpreter``, ``onnxruntime``), their CPU latency, and a predictor over an exported
file for ``xfer predict --model x.tflite|x.onnx|saved_model/``."""

from __future__ import annotations

import contextlib
import io
import os
import statistics
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import pandas as pd

from xfer import XferError


@contextlib.contextmanager
def quiet():
    """Silence stdout/stderr, also what C++ code writes to file descriptors 1 and 2 (converters' progress and
    errors, LiteRT's "Created TensorFlow Lite XNNPACK delegate"): a stage prints its summary line only (a failure
    is raised as one line instead)."""
    import sys
    import tempfile

    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 1)
        os.dup2(sink.fileno(), 2)
        try:
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)


def format_of(path: str | Path) -> str | None:
    """``tflite`` / ``onnx`` / ``savedmodel`` for an exported file (by suffix, or a folder with saved_model.pb)."""
    path = Path(path)
    if path.suffix == ".tflite":
        return "tflite"
    if path.suffix == ".onnx":
        return "onnx"
    if path.is_dir() and (path / "saved_model.pb").is_file():
        return "savedmodel"
    return None


def threads() -> int:
    """The CPU threads each runtime may use (all cores, as Keras does)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


class Runtime:
    """One exported file opened in its runtime: ``run(batch)`` -> (n, k) float32 probabilities; ``size``: the
    fixed input size."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.kind = format_of(self.path)
        if self.kind is None:
            raise XferError(f"{path}: not an exported model (.tflite, .onnx or a SavedModel folder)")
        if not self.path.exists():
            raise XferError(f"{path} not found; run the export stage first (dvc repro export)")
        try:
            getattr(self, f"_open_{self.kind}")()
        except XferError:
            raise
        except Exception as exc:  # noqa: BLE001 - a damaged file: one line
            raise XferError(f"{path}: cannot be opened by its runtime: {' '.join(str(exc).split())[:160]}") from None

    def _open_savedmodel(self) -> None:
        import tensorflow as tf

        self._fn = tf.saved_model.load(str(self.path)).signatures["serving_default"]
        spec = next(iter(self._fn.structured_input_signature[1].values()))
        self.size = int(spec.shape[1])
        self._key = next(iter(self._fn.structured_outputs))
        self._tf = tf

    def _open_tflite(self) -> None:
        from ai_edge_litert.interpreter import Interpreter

        with quiet():
            self._interp = Interpreter(model_path=str(self.path), num_threads=threads())
        self._in = self._interp.get_input_details()[0]
        self._out = self._interp.get_output_details()[0]
        self.size = int(self._in["shape"][1])
        self._batch = -1

    def _open_onnx(self) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads()
        options.log_severity_level = 3
        self._session = ort.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])
        self._input = self._session.get_inputs()[0].name
        self.size = int(self._session.get_inputs()[0].shape[1])

    def run(self, batch: np.ndarray) -> np.ndarray:
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        if self.kind == "savedmodel":
            return self._fn(self._tf.constant(batch))[self._key].numpy()
        if self.kind == "onnx":
            return self._session.run(None, {self._input: batch})[0]
        if len(batch) != self._batch:
            with quiet():
                self._interp.resize_tensor_input(self._in["index"], list(batch.shape), strict=True)
                self._interp.allocate_tensors()
            self._batch = len(batch)
        self._interp.set_tensor(self._in["index"], batch)
        self._interp.invoke()
        return self._interp.get_tensor(self._out["index"]).copy()


def latency_ms(run: Callable[[np.ndarray], object], batch: np.ndarray, repeats: int) -> float:
    """Median wall time of ``run(batch)`` in milliseconds over ``repeats`` runs, after two warm-up runs."""
    for _ in range(2):
        run(batch)
    times = []
    for _ in range(max(1, repeats)):
        start = time.perf_counter()
        run(batch)
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def timed_passes(runs: dict[str, Callable[[np.ndarray], np.ndarray]], batches: Iterable[np.ndarray]
                 ) -> tuple[dict[str, np.ndarray], dict[str, float], np.ndarray | None]:
    """``runs[name](batch)`` for every name on each batch (read once): the outputs concatenated per name, the
    seconds each name took (``read``: producing the batches), and the last batch (None when there was none)."""
    outputs: dict[str, list] = {name: [] for name in runs}
    seconds = dict.fromkeys(["read", *runs], 0.0)
    batch, batches = None, iter(batches)
    while True:
        start = time.perf_counter()
        batch_ = next(batches, None)
        seconds["read"] += time.perf_counter() - start
        if batch_ is None:
            break
        batch = batch_
        for name, run in runs.items():
            start = time.perf_counter()
            outputs[name].append(run(batch))
            seconds[name] += time.perf_counter() - start
    joined = {name: np.concatenate(out) if out else np.empty(0, np.float32) for name, out in outputs.items()}
    return joined, seconds, batch


def cpu_name() -> str:
    """The CPU's model name (lscpu / /proc/cpuinfo), with the core count."""
    import platform

    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name}, {threads()} threads"


class ExportedPredictor:
    """:class:`xfer.nets.serving.Predictor`'s interface over an exported file (its TTA and calibration are inside
    the file): ``predict_batch(images) -> DataFrame[class, probability]``."""

    def __init__(self, path: str | Path, classes: list[str]):
        self.runtime, self.classes, self.tta = Runtime(path), list(classes), None
        self.size = self.runtime.size

    def decode_all(self, images: list) -> np.ndarray:
        from xfer.nets.serving import decode

        return np.stack([decode(img, self.size) for img in images])

    def probabilities(self, batch: np.ndarray) -> np.ndarray:
        return np.concatenate([self.runtime.run(batch[i : i + 32]) for i in range(0, len(batch), 32)])

    def predict_batch(self, batch: np.ndarray) -> pd.DataFrame:
        p = self.probabilities(batch)
        if p.shape[1] != len(self.classes):
            raise XferError(f"{self.runtime.path} gives {p.shape[1]} classes but the classes file names "
                            f"{len(self.classes)}; pass the --classes of the data it was trained on")
        idx = p.argmax(axis=1)
        return pd.DataFrame({"class": [self.classes[i] for i in idx], "probability": p.max(axis=1)})

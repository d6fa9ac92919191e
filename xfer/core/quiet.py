"""A quiet TensorFlow start-up, whoever imports it first: TensorFlow's C++ start-up lines (printed before absl's
logging exists, so TF_CPP_MIN_LOG_LEVEL cannot stop them) are filtered out of stderr around the first
``import tensorflow`` or ``import keras`` anywhere in the process (a stage, an ``xfer`` subcommand, a library such
as MLflow or tf2onnx). Installed by ``xfer/__init__.py``; imports nothing of xfer."""

from __future__ import annotations

import importlib.abc
import importlib.util
import logging
import os
import re
import sys
import tempfile

# TensorFlow/absl/CUDA start-up lines that say nothing to a CPU user; everything else on stderr still shows.
STARTUP_NOISE = re.compile(
    r"All log messages before absl::InitializeLog\(\) is called"
    r"|Could not find cuda drivers"
    r"|cuInit|CUDA_ERROR|failed call to cuInit|cuda_executor|cuda_dnn|cuda_blas|cuda_fft"
    r"|Unable to register cu(DNN|FFT|BLAS) factory"
    r"|TF-TRT Warning|computation placer already registered"
    r"|oneDNN custom operations are on"
    r"|This TensorFlow binary is optimized to use available CPU instructions"
    r"|To enable the following instructions"
)
WATCHED = ("tensorflow", "keras")


class _Filtered:
    """Runs a module's code with file descriptor 2 captured, then prints the captured lines that are not noise."""

    depth = 0  # nested imports (keras imports tensorflow) are captured by the outermost one

    def __init__(self, exec_module):
        self.exec_module = exec_module

    def __call__(self, module) -> None:
        if _Filtered.depth:
            return self.exec_module(module)
        _Filtered.depth += 1
        sys.stderr.flush()
        saved = os.dup(2)
        try:
            with tempfile.TemporaryFile() as capture:
                os.dup2(capture.fileno(), 2)
                try:
                    self.exec_module(module)
                finally:
                    sys.stderr.flush()
                    os.dup2(saved, 2)
                    capture.seek(0)
                    kept = [line for line in capture.read().decode("utf-8", "replace").splitlines()
                            if line.strip() and not STARTUP_NOISE.search(line)]
                    if kept:
                        print("\n".join(kept), file=sys.stderr)
            _quiet_python_logger()
        finally:
            os.close(saved)
            _Filtered.depth -= 1


class QuietTensorFlow(importlib.abc.MetaPathFinder):
    """Finds ``tensorflow`` and ``keras`` through the other finders and wraps their loading in :class:`_Filtered`."""

    _busy = False

    def find_spec(self, name, path=None, target=None):  # noqa: ANN001, ANN201 - importlib's protocol
        if name not in WATCHED or QuietTensorFlow._busy:
            return None
        QuietTensorFlow._busy = True
        try:
            spec = importlib.util.find_spec(name)
        finally:
            QuietTensorFlow._busy = False
        if spec is not None and spec.loader is not None and hasattr(spec.loader, "exec_module"):
            spec.loader.exec_module = _Filtered(spec.loader.exec_module)
        return spec


def _quiet_python_logger() -> None:
    """TensorFlow's Python logger says only errors (not "... triggered tf.function retracing", which a search
    that trains hundreds of small heads provokes), unless the user set its level (XFER_TF_LOG_LEVEL=WARNING)."""
    logger = logging.getLogger("tensorflow")
    if logger.level == logging.NOTSET:
        logger.setLevel(os.environ.get("XFER_TF_LOG_LEVEL", "ERROR"))


def install() -> None:
    """Put the filter first on ``sys.meta_path`` (once)."""
    if not any(isinstance(f, QuietTensorFlow) for f in sys.meta_path):
        sys.meta_path.insert(0, QuietTensorFlow())


def import_tensorflow() -> None:
    """Import TensorFlow and Keras (quietly, through the filter)."""
    install()
    import keras  # noqa: F401
    import tensorflow  # noqa: F401

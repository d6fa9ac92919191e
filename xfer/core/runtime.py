"""How a stage runs TensorFlow (its quiet start-up is ``xfer.core.quiet``): precision per device, seeds and
determinism, XLA, and one progress bar for training."""

from __future__ import annotations

import logging
import os
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from xfer import XferError
from xfer.core import signals

# MLflow warnings about choices made on purpose: the pyfunc has an explicit signature, so no input example.
MLFLOW_NOISE = (r".*An input example was not provided when logging the model",)


def quiet_mlflow() -> None:
    """MLflow's INFO chatter off (its warnings stay on), no artifact-download progress bars, and exactly the
    warnings in MLFLOW_NOISE silenced."""
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    for pattern in MLFLOW_NOISE:
        warnings.filterwarnings("ignore", message=pattern, category=UserWarning)

    pyfunc_log = logging.getLogger("mlflow.pyfunc")
    if not any(isinstance(f, _PythonModelObjectNotice) for f in pyfunc_log.filters):
        pyfunc_log.addFilter(_PythonModelObjectNotice())


class _PythonModelObjectNotice(logging.Filter):
    """Drops MLflow's notice that a python_model object is pickled (ours is a small class in xfer/nets/serving.py)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Passing a Python object as `python_model`")


# Device kinds that run bfloat16 natively; elsewhere it is emulated and slower, so `auto` is float32 there.
NATIVE_BF16 = ("gpu_bf16", "cpu_amx", "cpu_avx512_bf16")
DEVICE_KINDS = ("cpu", "gpu", *NATIVE_BF16)


def cpu_flags() -> set[str]:
    """This CPU's feature flags (Linux ``/proc/cpuinfo``; empty where there is none)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    return next((set(line.split(":", 1)[1].split()) for line in text.splitlines() if line.startswith("flags")), set())


def gpu_capabilities() -> list[tuple[int, int]]:
    """Compute capability of each visible GPU (TensorFlow's device details)."""
    import tensorflow as tf

    caps = (tf.config.experimental.get_device_details(d).get("compute_capability")
            for d in tf.config.list_physical_devices("GPU"))
    return [tuple(cc) if cc else (0, 0) for cc in caps]


def device_kind(flags: set[str] | None = None, gpus: list[tuple[int, int]] | None = None) -> str:
    """What computes, as the precision tables name it: ``gpu_bf16`` (every visible GPU of compute capability
    >= 8.0), ``gpu`` (older GPUs), ``cpu_amx`` (AMX-BF16), ``cpu_avx512_bf16`` (AVX512-BF16 without AMX) or
    ``cpu`` (no native bfloat16)."""
    gpus = gpu_capabilities() if gpus is None else gpus
    if gpus:
        return "gpu_bf16" if all(cc >= (8, 0) for cc in gpus) else "gpu"
    flags = cpu_flags() if flags is None else flags
    if "amx_bf16" in flags:
        return "cpu_amx"
    return "cpu_avx512_bf16" if "avx512_bf16" in flags else "cpu"


def auto_precision(flags: set[str] | None = None, gpus: list[tuple[int, int]] | None = None,
                   table: dict[str, str] | None = None) -> str:
    """What ``runtime.precision: auto`` runs: float32 where bfloat16 would be emulated; on a device kind that has
    it natively, the backbone's measured choice (``backbone.precision``, a table filled by ``python
    bench/featurize.py precision --all``), else bfloat16 on GPUs and float32 on CPUs (unmeasured: never slower
    than float32). Decided from params and the hardware only, never from a timing, so it is deterministic."""
    kind = device_kind(flags, gpus)
    if kind not in NATIVE_BF16:
        return "float32"
    choice = (table or {}).get(kind) or ("bfloat16" if kind == "gpu_bf16" else "float32")
    if choice not in ("float32", "bfloat16"):
        raise XferError(f"backbone.precision.{kind}: '{choice}' is not float32 or bfloat16")
    return choice


JIT_SETTINGS = ("auto", True, False)


def use_jit(setting, deterministic: bool, gpus: list[tuple[int, int]] | None = None) -> bool:
    """``runtime.jit``: true | false, or auto = XLA on GPUs without op determinism (Keras's own rule) and never on
    a CPU, where bench/jit.py measured it slower (MobileNet: featurize 5x, head 1.8x, fine-tuning 3x slower;
    VGG16 featurize equal) and where it lacks augmentation and deterministic max-pool gradient kernels."""
    if setting not in JIT_SETTINGS or not isinstance(setting, (bool, str)):
        raise XferError(f"runtime.jit: {setting!r} is not one of auto, true, false")
    if setting == "auto":
        return bool(gpu_capabilities() if gpus is None else gpus) and not deterministic
    return bool(setting)


@contextmanager
def xla_errors() -> Iterator[None]:
    """Turn XLA's refusal to compile a training step (an op without an XLA kernel, or without a deterministic one)
    into one line that says what to set."""
    import tensorflow as tf

    try:
        yield
    except (tf.errors.UnimplementedError, tf.errors.InvalidArgumentError) as exc:
        lines = [line.strip() for line in str(exc).splitlines() if "XLA" in line]
        if not lines:
            raise
        raise XferError(f"runtime.jit=true: XLA cannot compile this training step ({lines[0][:160]}); set "
                        "runtime.jit=auto, or runtime.deterministic=false if it names determinism") from None


def set_jit(model, on: bool) -> None:
    """XLA (``jit_compile``) for the model's predict, train and test functions, set after ``compile``. Set
    directly: Keras refuses XLA whenever op determinism is on, for GPU kernels XLA cannot run deterministically;
    on a CPU, XLA runs under op determinism and its results equal the default kernels' (bench/jit.py)."""
    model._jit_compile = bool(on)
    model.predict_function = model.train_function = model.test_function = None


def seed_everything(seed: int, deterministic: bool) -> None:
    """Seed Python, NumPy, TensorFlow and Keras; with ``deterministic``, also make TensorFlow's ops
    deterministic (same inputs, same machine -> same bits; see README "Reproducibility")."""
    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(int(seed))
    if deterministic:
        tf.config.experimental.enable_op_determinism()


def progress_bar(desc: str):
    """A Keras callback drawing one tqdm bar over all training steps, with the epoch and the latest
    loss/accuracy (train and validation) as its postfix. Use with ``fit(verbose=0)``. After each call of the
    compiled step (one batch, or ``steps_per_execution`` of them: the bar counts them all) it raises a
    Ctrl-C/SIGTERM again that something inside TensorFlow swallowed (xfer.core.signals), so training stops."""
    import keras
    from tqdm import tqdm

    class ProgressBar(keras.callbacks.Callback):
        def on_train_begin(self, logs=None) -> None:
            self.epochs, self.steps = self.params.get("epochs") or 1, self.params.get("steps")
            self.bar = tqdm(total=self.epochs * self.steps if self.steps else None, desc=desc, unit="step",
                            file=sys.stderr, mininterval=1.0, dynamic_ncols=True)
            self.epoch = 0

        def on_epoch_begin(self, epoch: int, logs=None) -> None:
            self.epoch = epoch + 1
            self.bar.set_postfix_str(f"epoch {self.epoch}/{self.epochs}", refresh=False)

        def on_train_batch_end(self, batch: int, logs=None) -> None:
            # ``batch``: the last step of the call (steps_per_execution > 1 runs several, e.g. a whole epoch)
            done = ((max(self.epoch, 1) - 1) * self.steps + min(batch + 1, self.steps) if self.steps
                    else self.bar.n + 1)
            self.bar.update(max(done - self.bar.n, 0))
            signals.raise_if_interrupted()

        def on_epoch_end(self, epoch: int, logs=None) -> None:
            shown = {k: v for k, v in (logs or {}).items() if k.rsplit("_", 1)[-1] in ("loss", "accuracy")}
            self.bar.set_postfix_str(f"epoch {self.epoch}/{self.epochs} "
                                     + " ".join(f"{k} {float(v):.4f}" for k, v in shown.items()))

        def on_train_end(self, logs=None) -> None:
            self.bar.close()

    return ProgressBar()

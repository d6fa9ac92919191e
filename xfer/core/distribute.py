"""Several devices: ``runtime.strategy`` (auto | one | mirrored) -> the ``tf.distribute.Strategy`` under which
featurize, train_head and finetune build, compile, train, run and save their models; and ``XFER_CPU_DEVICES``,
a testing/development aid that shows the CPU to TensorFlow as several devices (README: "Several devices")."""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from xfer import XferError

STRATEGIES = ("auto", "one", "mirrored")
CPU_DEVICES = "XFER_CPU_DEVICES"  # e.g. 2: MirroredStrategy across two logical CPUs, to test it without GPUs


def choose(setting, gpus: int) -> str:
    """``one`` or ``mirrored`` for ``runtime.strategy`` and the number of visible GPUs: auto mirrors over the
    GPUs when there are several, ``one`` is TensorFlow's default strategy (one device)."""
    if not isinstance(setting, str) or setting not in STRATEGIES:
        raise XferError(f"runtime.strategy: {setting!r} is not one of {', '.join(STRATEGIES)}")
    if setting == "auto":
        return "mirrored" if gpus > 1 else "one"
    return setting


def split_cpu() -> None:
    """With ``XFER_CPU_DEVICES=N``, present the CPU as N logical devices (same cores, no speed-up); TensorFlow
    only allows this before it initializes its devices, so the stages call it first."""
    value = os.environ.get(CPU_DEVICES, "").strip()
    if not value:
        return
    if not value.isdigit() or int(value) < 1:
        raise XferError(f"{CPU_DEVICES}={value!r} is not a whole number >= 1 (logical CPU devices)")
    import tensorflow as tf

    n = int(value)
    cpu = tf.config.list_physical_devices("CPU")[0]
    try:
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * n)
    except RuntimeError:
        pass  # TensorFlow's devices already exist: fine if they are the ones asked for
    if len(tf.config.list_logical_devices("CPU")) != n:
        raise XferError(f"{CPU_DEVICES}={n}: TensorFlow had already set up its devices; set the variable "
                        "before the stage's process starts")


def strategy_for(setting, jit=False):
    """The strategy for ``runtime.strategy``: ``MirroredStrategy`` over every visible GPU (with none, every
    logical CPU device) or the default strategy. Call it first: it may split the CPU (:func:`split_cpu`).
    ``jit``: ``runtime.jit``, refused as true when mirroring over several CPU devices (XLA places each variable on
    one device and the step on another)."""
    choose(setting, 0)  # a bad setting fails before TensorFlow starts its devices
    split_cpu()
    import tensorflow as tf

    gpus = tf.config.list_logical_devices("GPU")
    if choose(setting, len(gpus)) == "one":
        return tf.distribute.get_strategy()
    devices = tuple(d.name for d in gpus or tf.config.list_logical_devices("CPU"))
    if jit is True and not gpus and len(devices) > 1:
        raise XferError(f"runtime.jit=true: XLA cannot run runtime.strategy=mirrored over {len(devices)} CPU "
                        "devices; set runtime.jit=auto or runtime.strategy=one")
    return mirrored(devices)


@functools.cache
def mirrored(devices: tuple[str, ...]):
    """One ``MirroredStrategy`` per set of devices and process: two would number their collective all-reduce ops
    alike, and the second's training step would fail on the first's ("Shape mismatch in the collective instance"),
    e.g. in tests that run several stages in one process."""
    import tensorflow as tf

    return tf.distribute.MirroredStrategy(list(devices))


def strategy_name(strategy) -> str:
    """``one`` (TensorFlow's default strategy) or ``mirrored``, as logged."""
    import tensorflow as tf

    return "mirrored" if isinstance(strategy, tf.distribute.MirroredStrategy) else "one"


@contextmanager
def distributed(strategy, log_params: Callable[[dict], None]) -> Iterator[object]:
    """Record ``strategy_used`` and ``replicas`` with ``log_params`` (the stage run's, xfer.track.recorder) and
    run the body inside the strategy's scope (create models and optimizers, load weights there; predict with
    :func:`predict_on_batch`)."""
    replicas = int(strategy.num_replicas_in_sync)
    log_params({"strategy_used": strategy_name(strategy), "replicas": replicas})
    with strategy.scope():
        yield strategy


def check_loss_scaling(strategy) -> None:
    """Refuse to train in float16 over several replicas: Keras's loss scaling (LossScaleOptimizer) looks for
    overflowing gradients on the first replica only, so one overflow elsewhere turns every weight into NaN."""
    import keras

    n = int(strategy.num_replicas_in_sync)
    if n > 1 and keras.mixed_precision.global_policy().name == "mixed_float16":
        raise XferError(f"runtime.precision=float16 cannot train with runtime.strategy=mirrored over {n} replicas "
                        "(Keras checks one replica's gradients for overflow); use bfloat16 or float32, and rerun "
                        "featurize")


def predict_on_batch(model, x):
    """``model.predict_on_batch(x)``, with the batch split over the replicas when the model was built under a
    strategy of several: Keras 3 gives every replica the whole batch and concatenates the copies (N times the
    rows). Contiguous shards in replica order, so the rows keep the batch's order."""
    import numpy as np
    import tensorflow as tf

    strategy = model.distribute_strategy
    n = strategy.num_replicas_in_sync
    if n == 1 or isinstance(x, tf.distribute.DistributedValues):
        return model.predict_on_batch(x)
    x = tf.convert_to_tensor(x)
    cuts = np.linspace(0, int(x.shape[0]), n + 1).astype(int)
    shards = strategy.experimental_distribute_values_from_function(
        lambda ctx: x[cuts[ctx.replica_id_in_sync_group] : cuts[ctx.replica_id_in_sync_group + 1]])
    return model.predict_on_batch(shards)

"""Stages as processes: SIGINT and SIGTERM discard partial outputs and mark the MLflow run KILLED; after a
SIGKILL the next run cleans up and closes the orphaned run; a normal run prints one bar and one summary line."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import TINY, tiny_project

# Slow enough to be caught mid-run: batch 1 at 96 px (featurize), many short epochs (finetune).
SLOW_FEATURIZE = [*TINY, "backbone.image_size=96", "featurize.batch_size=1"]
SLOW_FINETUNE = [*TINY, "finetune.epochs=500", "finetune.patience=null", "finetune.reduce_lr_patience=null"]


@pytest.fixture(scope="module")
def ready(tmp_path_factory):
    """A tiny project whose download, split, featurize and train_head outputs exist."""
    stages = ["download", "split", "featurize", "train_head"]
    with tiny_project(tmp_path_factory.mktemp("interrupts") / "proj", stages, "interrupts") as (root, _):
        yield root


def start(root: Path, stage: str, overrides: list[str]) -> subprocess.Popen:
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{root}/mlflow.db", "XFER_PIPELINE_ID": "interrupts"}
    env.pop("DVC_ROOT", None)
    # A shell's background job (`cmd &`, nohup) starts with SIGINT ignored, which Python then respects: give the
    # stage the default disposition a terminal user has, so Ctrl-C is what the test sends.
    return subprocess.Popen([sys.executable, "-m", f"stages.{stage}", *overrides], cwd=root, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def wait_for(proc: subprocess.Popen, found, what: str, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while not found():
        if proc.poll() is not None:
            raise AssertionError(f"stage ended before {what}: {proc.stderr.read()[-2000:]}")
        if time.time() > deadline:
            proc.kill()
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def digest(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            h.update(p.relative_to(folder).as_posix().encode() + p.read_bytes())
    return h.hexdigest()


def stage_runs(root: Path, stage: str):
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{root}/mlflow.db")
    exp = client.get_experiment_by_name("synthetic")
    return client.search_runs([exp.experiment_id], f"tags.stage = '{stage}'",
                              order_by=["attributes.start_time DESC"])


def temporaries(root: Path) -> list[Path]:
    return [p for d in ("data/features", "models", "reports/plots", "reports/metrics") if (root / d).is_dir()
            for p in (root / d).iterdir() if ".tmp" in p.name]


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143)])  # SIGINT: the finetune test and test_config
def test_signal_during_featurize_keeps_the_old_features(ready, sig, code):
    root = ready
    before = digest(root / "data/features/vgg16")
    proc = start(root, "featurize", SLOW_FEATURIZE)
    wait_for(proc, lambda: list((root / "data/features").glob(".vgg16.tmp*/train_features.npy")),
             "featurize to write features")
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err[-2000:]
    assert "partial outputs were discarded" in err and "Traceback" not in err
    assert not temporaries(root), temporaries(root)
    assert digest(root / "data/features/vgg16") == before  # the previous complete output, untouched
    assert stage_runs(root, "featurize")[0].info.status == "KILLED"


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_during_finetune_leaves_no_model(ready, sig, code):
    root = ready
    (root / "models/model.keras").unlink(missing_ok=True)
    proc = start(root, "finetune", SLOW_FINETUNE)
    wait_for(proc, lambda: list((root / "reports/plots").glob(".finetune.csv.tmp*")), "finetune to train")
    time.sleep(1.0)  # a few epochs in
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err[-2000:]
    assert "Traceback" not in err
    assert not temporaries(root), temporaries(root)
    assert not (root / "models/model.keras").exists()
    assert stage_runs(root, "finetune")[0].info.status == "KILLED"


def test_after_sigkill_the_next_run_cleans_up_and_closes_the_orphan(ready):
    root = ready
    proc = start(root, "featurize", SLOW_FEATURIZE)
    wait_for(proc, lambda: list((root / "data/features").glob(".vgg16.tmp*/train_features.npy")),
             "featurize to write features")
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert temporaries(root)  # what a SIGKILL leaves: a half-written folder ...
    orphan = stage_runs(root, "featurize")[0]
    assert orphan.info.status == "RUNNING"  # ... and a run nobody will close
    rerun = start(root, "featurize", TINY)
    out, err = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, err[-2000:]
    assert not temporaries(root)
    assert stage_runs(root, "featurize")[1].info.status == "KILLED"  # the orphan, closed by the rerun
    assert stage_runs(root, "featurize")[0].info.status == "FINISHED"
    # Readable output: the progress bars and one summary line; no TensorFlow/absl/CUDA/MLflow start-up noise.
    assert out.strip().splitlines() == [out.strip()] and out.startswith("featurize: vgg16 features")
    for noise in ("absl", "cuda", "cuInit", "oneDNN", "Warning", "WARNING", "INFO"):
        assert noise not in err, f"{noise!r} in stderr:\n{err}"
    assert "featurize train: 100%" in err


def test_a_signal_that_tensorflow_swallowed_still_stops_training():
    """TensorFlow may ignore the exception our handler raised (e.g. inside a finalizer): the progress bar, in every
    fit, raises the remembered signal again after the next step."""
    from xfer.core import signals
    from xfer.core.runtime import progress_bar

    bar = progress_bar("test")
    bar.set_params({"epochs": 1, "steps": 2})
    bar.on_train_begin()
    bar.on_train_batch_end(0)  # nothing received: goes on
    signals.received.append(signal.SIGTERM)
    try:
        with pytest.raises(signals.Terminated):
            bar.on_train_batch_end(1)
    finally:
        signals.received.clear()
        bar.on_train_end()


def _inside_tensorflow(fn):
    """Call ``fn`` from a frame whose code lives in a ``tensorflow`` package folder (as TensorFlow's own code)."""
    scope: dict = {}
    exec(compile("def run(fn):\n    return fn()\n", os.path.join(os.sep, "site", "tensorflow", "op.py"), "exec"),
         scope)
    return scope["run"](fn)


@pytest.fixture
def handlers(monkeypatch):
    """Our signal handlers installed in this process for one test, with a fresh memory; restored after."""
    from xfer.core import signals

    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    monkeypatch.setattr(signals, "received", [])
    monkeypatch.setattr(signals, "FORCE_AFTER_S", 0.5)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal, even under a background CI job
    signals.install()
    yield signals
    for s, handler in saved.items():
        signal.signal(s, handler)


def test_a_signal_inside_tensorflow_waits_for_the_next_step_boundary(handlers):
    """Raised inside TensorFlow's code, the exception could land in a Python callback of its C++ code, which prints
    a traceback: the signal is remembered there and raised at the next step boundary instead."""
    _inside_tensorflow(lambda: (os.kill(os.getpid(), signal.SIGTERM), time.sleep(0.05)))  # no exception here
    assert handlers.received == [signal.SIGTERM]
    with pytest.raises(handlers.Terminated):
        handlers.raise_if_interrupted()
    time.sleep(1.0)  # the fallback timer was cancelled: no second signal arrives
    assert handlers.received == [signal.SIGTERM]
    with pytest.raises(KeyboardInterrupt):  # outside TensorFlow's code, at once
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(5)


def test_a_deferred_signal_is_raised_anyway_when_no_step_boundary_comes(handlers):
    start_s = time.monotonic()
    with pytest.raises(handlers.Terminated):
        _inside_tensorflow(lambda: (os.kill(os.getpid(), signal.SIGTERM), time.sleep(10)))
    assert 0.4 < time.monotonic() - start_s < 5

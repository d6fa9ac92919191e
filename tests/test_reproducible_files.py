"""Byte-reproducible outputs: .keras files without save times or memory addresses; stale temporaries of dead
processes cleaned up."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys

import numpy as np

from xfer.core.files import atomic_dir, atomic_path, remove_stale_temporaries


def _model(seed: int):
    import keras

    keras.backend.clear_session()  # layer names restart (dense, dense_1, ...) as in a fresh stage process
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((4,))
    x = keras.layers.Dense(8, activation="relu")(inputs)
    x = keras.layers.Dropout(0.5)(x)
    return keras.Model(inputs, keras.layers.Dense(1, activation="sigmoid")(x))


def test_same_model_same_keras_bytes(tmp_path):
    """Two identical models (distinct Python objects, saved a second apart) give identical .keras bytes, and
    the rewritten file loads back to the same predictions."""
    import time

    import keras

    from xfer.nets.models import save_model

    first, second = _model(0), _model(0)
    first.save(str(tmp_path / "raw1.keras"))
    time.sleep(1.1)
    second.save(str(tmp_path / "raw2.keras"))
    raw = [(tmp_path / f"raw{i}.keras").read_bytes() for i in (1, 2)]
    assert raw[0] != raw[1]  # plain Keras: save time and memory addresses inside
    save_model(first, tmp_path / "a.keras")
    time.sleep(1.1)
    save_model(second, tmp_path / "b.keras")
    assert (tmp_path / "a.keras").read_bytes() == (tmp_path / "b.keras").read_bytes()
    x = np.random.default_rng(0).normal(size=(5, 4)).astype("float32")
    loaded = keras.saving.load_model(str(tmp_path / "a.keras"))
    np.testing.assert_allclose(loaded.predict(x, verbose=0), first.predict(x, verbose=0), rtol=0, atol=1e-6)
    assert not list(tmp_path.glob(".*tmp*"))


def test_keras_bytes_do_not_depend_on_the_process(tmp_path):
    """The same model saved by two separate processes: identical files (what `dvc repro -f` relies on)."""
    code = ("import sys; sys.path.insert(0, sys.argv[2]); from tests.test_reproducible_files import _model; "
            "from xfer.nets.models import save_model; save_model(_model(0), sys.argv[1])")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    digests = []
    for name in ("p1.keras", "p2.keras"):
        subprocess.run([sys.executable, "-c", code, str(tmp_path / name), root], check=True, capture_output=True)
        digests.append(hashlib.sha256((tmp_path / name).read_bytes()).hexdigest())
    assert digests[0] == digests[1]


def test_stale_temporaries_of_dead_processes_are_removed(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True).stdout.strip()
    target = tmp_path / "features"
    stale_dir = tmp_path / f".features.tmp{dead}-abc"
    stale_dir.mkdir()
    (stale_dir / "train_features.npy").write_bytes(b"half")
    stale_file = tmp_path / f".features.tmp{dead}.npy"
    stale_file.write_bytes(b"half")
    alive = tmp_path / f".features.tmp{os.getppid()}-xyz"  # a live process's work in progress: kept
    alive.mkdir()
    other = tmp_path / f".other.tmp{dead}-abc"  # another target's: not ours to judge
    other.mkdir()
    assert set(remove_stale_temporaries(target)) == {stale_dir, stale_file}
    assert alive.exists() and other.exists()
    stale_dir.mkdir()
    with atomic_dir(target) as tmp:  # the atomic writers clean up before they start
        (tmp / "x").write_text("done")
    assert not stale_dir.exists() and (target / "x").read_text() == "done"
    with atomic_path(tmp_path / "other") as tmp:
        tmp.write_text("ok")
    assert not other.exists()

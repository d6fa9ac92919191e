"""Shared fixtures: no network, a throwaway copy of the project, a tiny config."""

from __future__ import annotations

import importlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
PROJECT_FILES = ["dvc.yaml", "params.yaml", "pyproject.toml", "conf", "stages", "xfer", "weights"]


@pytest.fixture(scope="session", autouse=True)
def warm_processes(tmp_path_factory):
    """The suite's stage processes use warm starts (xfer.core.warm) as users' do, from a folder of its own
    whose warm processes are stopped at the end (and end by themselves after 5 idle minutes)."""
    saved = {k: os.environ.get(k) for k in ("XFER_WARM_DIR", "XFER_WARM_IDLE")}
    os.environ["XFER_WARM_DIR"] = str(tmp_path_factory.mktemp("warm"))
    os.environ["XFER_WARM_IDLE"] = "300"
    yield
    from xfer.core import warm

    warm.stop_all()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Refuse every connection that does not go to this machine."""
    real_connect = socket.socket.connect

    def guarded(self, address):
        host = address[0] if isinstance(address, tuple) else address
        if isinstance(host, str) and host not in ("127.0.0.1", "::1", "localhost") and self.family != socket.AF_UNIX:
            raise ConnectionRefusedError(f"tests may not use the network (tried {address})")
        return real_connect(self, address)

    monkeypatch.setattr(socket.socket, "connect", guarded)
    monkeypatch.setattr(socket, "getaddrinfo", _local_getaddrinfo(socket.getaddrinfo))


def _local_getaddrinfo(real):
    def lookup(host, *args, **kwargs):
        if host not in (None, "127.0.0.1", "::1", "localhost"):
            raise socket.gaierror(f"tests may not use the network (looked up {host})")
        return real(host, *args, **kwargs)

    return lookup


def copy_project(dest: Path) -> Path:
    """Copy the project's code and config (not data, models, mlruns) into ``dest``."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in PROJECT_FILES:
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src, dest / name)
    return dest


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A copy of the project as the working directory, with its own MLflow database."""
    root = copy_project(tmp_path / "proj")
    monkeypatch.chdir(root)
    monkeypatch.delenv("DVC_ROOT", raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root}/mlruns/mlflow.db")
    (root / "mlruns").mkdir()
    return root


@pytest.fixture(scope="session")
def team_stack():
    """The local team stack (``xfer stack up``: PostgreSQL, SeaweedFS, mlflow server) on free 127.0.0.1
    ports, shared by the e2e team test and tests/test_stack.py (which ends by stopping it). Its folder is in /tmp:
    the postgres system user cannot enter pytest's mode-700 tmp dirs. ``env``: the CLI's environment;
    ``client_env``: what `xfer stack env` exports; ``dvc_remote``: the dvc commands `up` prints."""
    from xfer.stack import control as xstack
    from xfer.stack import services as svc

    folder = Path(tempfile.mkdtemp(prefix="xfer-stack-", dir="/tmp"))
    ports = dict(zip(xstack.SERVICES, svc.free_ports(3), strict=True))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("XFER_STACK_", "AWS_", "MLFLOW_"))}
    env.update({xstack.port_env(s): str(p) for s, p in ports.items()},
               XFER_STACK_DIR=str(folder), XFER_STACK_MLFLOW_WORKERS="1", MLFLOW_DISABLE_TELEMETRY="true",
               XFER_STACK_STOP_TIMEOUT="3")  # no 15 s drain of weed's idle streams: the data must survive a kill

    def cli(*args: str) -> str:
        proc = subprocess.run([sys.executable, "-m", "xfer", "stack", *args], capture_output=True, text=True, env=env,
                              cwd=REPO, timeout=600)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout

    out = cli("up")
    client_env = dict(line.removeprefix("export ").split("=", 1) for line in cli("env").splitlines())
    dvc_remote = [line.split()[1:] for line in out.splitlines() if line.startswith("dvc remote ")]
    try:
        yield {"dir": folder, "ports": ports, "env": env, "cli": cli, "url": f"http://127.0.0.1:{ports['mlflow']}",
               "client_env": client_env, "dvc_remote": dvc_remote}
    finally:
        subprocess.run([sys.executable, "-m", "xfer", "stack", "down"], env=env, cwd=REPO, timeout=600)
        shutil.rmtree(folder, ignore_errors=True)


TINY = [
    "data=synthetic", "data.per_class=24", "data.image_size=40",
    "split.train=12", "split.val=6", "split.test=6",
    "backbone.weights=null", "backbone.image_size=32",
    "head.epochs=3", "head.batch_size=8",
    "finetune.epochs=1", "finetune.batch_size=8",
    "featurize.batch_size=8", "evaluate.batch_size=8",
    "runtime.precision=float32",  # not auto: the same float checks on every CPU (tests of auto fake the flags)
    "finetune.trunk_views=0",  # fine-tuning on images; trunk views (the default) in test_trunk.py and the e2e demo
]


@contextmanager
def tiny_project(folder: Path, stages: list[str], pipeline_id: str, extra: Sequence[str] = ()
                 ) -> Iterator[tuple[Path, object]]:
    """A copy of the project (working directory, own MLflow database) with ``stages`` run in-process on the
    TINY params (and ``extra`` overrides); yields the root and the params."""
    from xfer.core.config import load_params

    with pytest.MonkeyPatch.context() as mp:
        root = copy_project(folder)
        mp.chdir(root)
        mp.delenv("DVC_ROOT", raising=False)
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root}/mlflow.db")
        mp.setenv("XFER_PIPELINE_ID", pipeline_id)
        cfg = load_params([*TINY, *extra])
        for stage in stages:
            importlib.import_module(f"stages.{stage}").main(cfg)
        yield root, cfg


@pytest.fixture
def tiny_cfg(project):
    """Params for a seconds-long run on generated images with a random-weight VGG16 at 32 px."""
    from xfer.core.config import load_params

    return load_params(TINY)


# Float comparisons across batchings, thread counts, precisions or CPUs. oneDNN picks kernels by batch shape and
# instruction set (AVX2, AVX-512, AMX), and each sums in its own order: float32 results then differ by a few
# units of eps = 1.2e-7 per accumulation, i.e. ~1e-6 of the largest magnitude after a deep network (seen: 7e-8
# absolute where values are near zero, which is 7e-4 *relative*, so rtol alone is the wrong test). 1e-4 of the
# largest magnitude is 100x that, and still 10,000x below the O(1) change of a wrong image, row or weight.
FLOAT32_ATOL = 1e-4
FLOAT16_ULP = 2.0**-10  # float16 storage: two roundings of nearly equal values may differ by one ulp


def assert_features_close(actual, expected, dtype: str = "float32") -> None:
    """``actual`` equals ``expected`` up to float32 summation-order noise (and float16 rounding), measured
    against the largest magnitude in ``expected``."""
    expected = np.asarray(expected, dtype=np.float64)
    scale = float(np.max(np.abs(expected))) or 1.0
    atol = (FLOAT32_ATOL + (FLOAT16_ULP if dtype == "float16" else 0.0)) * scale
    np.testing.assert_allclose(np.asarray(actual, dtype=np.float64), expected, rtol=0, atol=atol)


def pytest_collection_modifyitems(config, items):
    """The end-to-end module first: with ``-n`` (pyproject's addopts) its minutes then overlap the other files."""
    items.sort(key=lambda item: item.get_closest_marker("e2e") is None)


def pytest_xdist_auto_num_workers(config) -> int:
    """``-n auto``: one worker per core, at most 4 (each worker's TensorFlow uses every core already)."""
    return max(1, min(os.cpu_count() or 1, 4))

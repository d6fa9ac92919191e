"""Runtime: runtime.precision=auto picks bfloat16 only on hardware that runs it natively, and a pipeline that it
switched to bfloat16 records the choice and still passes fine-tuning's exact transplant check."""

from __future__ import annotations

import json

import pytest

from tests.conftest import TINY, tiny_project
from xfer.core.runtime import auto_precision


@pytest.mark.parametrize("flags, gpus, expected", [
    ({"avx2", "fma"}, [], "float32"),                                # AVX2 EPYC: bfloat16 would be emulated
    ({"avx512f", "avx512bw"}, [], "float32"),                        # AVX-512 without BF16
    ({"avx512f", "avx512_bf16"}, [], "bfloat16"),                    # Cooper Lake, Zen 4
    ({"amx_bf16", "amx_tile"}, [], "bfloat16"),                      # Sapphire Rapids
    ({"avx2"}, [(8, 0)], "bfloat16"),                                # A100
    ({"avx512_bf16"}, [(7, 5)], "float32"),                          # T4: the GPU computes, and it has no bf16
    ({"avx2"}, [(8, 6), (7, 0)], "float32"),                         # every visible GPU must run it
])
def test_auto_precision_follows_the_hardware(flags, gpus, expected):
    assert auto_precision(flags, gpus) == expected


def test_auto_reads_this_machines_cpu_flags(monkeypatch):
    import xfer.core.runtime as runtime

    monkeypatch.setattr(runtime, "gpu_capabilities", lambda: [])
    monkeypatch.setattr(runtime, "cpu_flags", lambda: {"fpu", "amx_bf16"})
    assert auto_precision() == "bfloat16"
    monkeypatch.setattr(runtime, "cpu_flags", lambda: {"fpu", "avx2"})
    assert auto_precision() == "float32"


def test_cpu_flags_parses_proc_cpuinfo():
    from pathlib import Path

    from xfer.core.runtime import cpu_flags

    if not Path("/proc/cpuinfo").is_file():
        pytest.skip("no /proc/cpuinfo on this system")
    assert {"fpu"} <= cpu_flags()  # every x86-64 CPU has it


def test_auto_on_a_bf16_cpu_runs_featurize_and_finetune_in_bfloat16(tmp_path, monkeypatch):
    import keras
    import mlflow

    import xfer.core.runtime as runtime
    from xfer.core.config import load_params

    monkeypatch.setattr(runtime, "cpu_flags", lambda: {"avx512f", "avx512_bf16"})
    monkeypatch.setattr(runtime, "gpu_capabilities", lambda: [])
    try:
        with tiny_project(tmp_path / "proj", ["download", "split"], "bf16") as (root, _):
            cfg = load_params([*TINY, "runtime.precision=auto"])
            for stage in ("featurize", "views", "trunk", "train_head", "finetune"):
                __import__(f"stages.{stage}", fromlist=["main"]).main(cfg)
            meta = json.loads((root / "data/features/vgg16/meta.json").read_text())
            client = mlflow.MlflowClient(f"sqlite:///{root}/mlflow.db")
            runs = {r.data.tags["stage"]: r for r in client.search_runs(
                [client.get_experiment_by_name("synthetic").experiment_id], "tags.role = 'stage'")}
    finally:
        keras.mixed_precision.set_global_policy("float32")  # the policy is global to this test process
    assert meta["precision"] == "bfloat16"
    assert runs["featurize"].data.params["runtime.precision"] == "auto"
    assert runs["featurize"].data.params["precision_used"] == "bfloat16"
    assert runs["finetune"].data.params["precision_used"] == "bfloat16"
    assert runs["finetune"].data.metrics["transplant_max_abs_diff"] == 0.0  # featurize's batches, same kernels


@pytest.mark.parametrize("setting, deterministic, gpus, expected", [
    ("auto", True, [], False), ("auto", False, [], False),     # CPU: measured slower (bench/jit.py)
    ("auto", False, [(8, 0)], True), ("auto", True, [(8, 0)], False),  # GPU: Keras's rule
    (True, True, [], True), (False, False, [(8, 0)], False),
])
def test_use_jit(setting, deterministic, gpus, expected):
    from xfer.core.runtime import use_jit

    assert use_jit(setting, deterministic, gpus) is expected


@pytest.mark.parametrize("bad", ["yes", 1, None])
def test_bad_jit_setting_is_one_line(bad):
    from xfer import XferError
    from xfer.core.runtime import use_jit

    with pytest.raises(XferError, match=r"^runtime\.jit: .* is not one of auto, true, false$"):
        use_jit(bad, True, [])


def test_jit_true_reaches_every_model_and_xla_refusals_are_one_line(tmp_path, monkeypatch):
    """runtime.jit=true compiles featurize's base, the views' and trunk's models and the head with XLA (spied);
    fine-tuning VGG16's block 5 under op determinism has no deterministic XLA max-pool gradient: one line."""
    import xfer.core.runtime as runtime
    from xfer import XferError
    from xfer.core.config import load_params

    calls = []
    real = runtime.set_jit
    monkeypatch.setattr(runtime, "set_jit", lambda model, on: (calls.append((model.name, on)), real(model, on)))
    with tiny_project(tmp_path / "proj", ["download", "split"], "jit") as (root, _):
        cfg = load_params([*TINY, "runtime.jit=true", "featurize.train_views=1", "finetune.trunk_views=1"])
        for stage in ("featurize", "views", "trunk", "train_head"):
            __import__(f"stages.{stage}", fromlist=["main"]).main(cfg)
        assert {name for name, on in calls if on} >= {"base_vgg16", "trunk", "head"}
        assert all(on for _, on in calls)
        with pytest.raises(XferError, match=r"^runtime\.jit=true: XLA cannot compile .*determinism"):
            __import__("stages.finetune", fromlist=["main"]).main(cfg)

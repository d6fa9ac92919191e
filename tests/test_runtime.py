"""Runtime: runtime.precision=auto picks bfloat16 only on hardware that runs it natively, and a pipeline that it
switched to bfloat16 records the choice and still passes fine-tuning's exact transplant check."""

from __future__ import annotations

import json
import os

import pytest

from tests.conftest import TINY, tiny_project
from xfer.core.runtime import auto_precision

MEASURED = {"cpu_avx512_bf16": "float32"}  # a depthwise network's table (conf/backbone/mobilenet.yaml)


@pytest.mark.parametrize("flags, gpus, table, expected", [
    ({"avx2", "fma"}, [], None, "float32"),                               # AVX2 EPYC: bfloat16 would be emulated
    ({"avx2", "fma"}, [], {"cpu": "bfloat16"}, "float32"),                # ... whatever a table says
    ({"avx512f", "avx512bw"}, [], None, "float32"),                       # AVX-512 without BF16
    ({"avx512f", "avx512_bf16"}, [], {"cpu_avx512_bf16": "bfloat16"}, "bfloat16"),  # Zen 4, VGG: measured faster
    ({"avx512f", "avx512_bf16"}, [], MEASURED, "float32"),                # Zen 4, MobileNet: measured slower
    ({"avx512f", "avx512_bf16"}, [], None, "float32"),                    # unmeasured on a CPU: never slower
    ({"amx_bf16", "amx_tile", "avx512_bf16"}, [], {"cpu_amx": "bfloat16", **MEASURED}, "bfloat16"),  # AMX: own key
    ({"avx2"}, [(8, 0)], None, "bfloat16"),                               # A100: Keras's standard choice
    ({"avx2"}, [(8, 0)], {"gpu_bf16": "float32"}, "float32"),             # ... unless measured otherwise
    ({"avx512_bf16"}, [(7, 5)], {"gpu_bf16": "bfloat16"}, "float32"),     # T4: the GPU computes, and it has no bf16
    ({"avx2"}, [(8, 6), (7, 0)], None, "float32"),                        # every visible GPU must run it
])
def test_auto_precision_follows_the_hardware_and_the_backbones_table(flags, gpus, table, expected):
    assert auto_precision(flags, gpus, table) == expected


def test_a_bad_table_entry_is_one_line():
    from xfer import XferError

    with pytest.raises(XferError, match=r"^backbone\.precision\.cpu_avx512_bf16: 'fast' is not float32 or bfloat16"):
        auto_precision({"avx512_bf16"}, [], {"cpu_avx512_bf16": "fast"})


def test_every_backbone_has_a_measured_choice_for_bf16_cpus_and_depthwise_nets_stay_float32():
    """The table bench/featurize.py precision --all --write filled (AMD EPYC with AVX512-BF16): auto resolves as
    it says, and the depthwise-heavy MobileNets stay float32 (bfloat16 measured 0.67x and 0.89x)."""
    from omegaconf import OmegaConf

    from tests.conftest import REPO

    for conf in sorted((REPO / "conf" / "backbone").glob("*.yaml")):
        table = OmegaConf.to_container(OmegaConf.load(conf).precision)
        assert table["cpu_avx512_bf16"] in ("float32", "bfloat16"), conf.name
        assert auto_precision({"avx512_bf16"}, [], table) == table["cpu_avx512_bf16"], conf.name
        assert auto_precision({"avx2"}, [], table) == "float32", conf.name
    for name in ("mobilenet", "mobilenetv2"):
        assert OmegaConf.load(REPO / "conf" / "backbone" / f"{name}.yaml").precision.cpu_avx512_bf16 == "float32"


def test_auto_reads_this_machines_cpu_flags(monkeypatch):
    import xfer.core.runtime as runtime

    monkeypatch.setattr(runtime, "gpu_capabilities", lambda: [])
    monkeypatch.setattr(runtime, "cpu_flags", lambda: {"fpu", "amx_bf16"})
    assert auto_precision(table={"cpu_amx": "bfloat16"}) == "bfloat16"
    monkeypatch.setattr(runtime, "cpu_flags", lambda: {"fpu", "avx2"})
    assert auto_precision(table={"cpu_amx": "bfloat16"}) == "float32"


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
            cfg = load_params([*TINY, "runtime.precision=auto", "backbone.precision.cpu_avx512_bf16=bfloat16"])
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


def test_tensorflow_start_up_is_quiet_whoever_imports_it_first():
    """The filter sits on the import itself: a module that imports Keras before any stage helper did (as the
    trunk stage's backbone import once did) still starts quietly; other stderr lines pass through."""
    import subprocess
    import sys

    from tests.conftest import REPO
    from xfer.core.quiet import STARTUP_NOISE

    def stderr(code: str) -> str:
        env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
        return subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, env=env,
                              timeout=300).stderr

    bare = stderr("import keras")
    if not STARTUP_NOISE.search(bare):
        pytest.skip("this TensorFlow build prints no start-up noise to filter")
    for code in ("import xfer.nets.backbones", "import xfer, tensorflow as tf; tf.constant(1).numpy()",
                 "import stages.trunk, keras"):
        err = stderr(code)
        assert not STARTUP_NOISE.search(err) and "absl" not in err, f"{code}: {err}"
    assert "kept" in stderr("import sys, xfer, keras; print('kept', file=sys.stderr)")
    # TensorFlow's Python warnings (retracing, deprecations) are quiet too; its errors still show
    log = "import xfer, keras, tensorflow as tf; tf.get_logger().{}('tf-says-{}')"
    assert "tf-says-warning" not in stderr(log.format("warning", "warning"))
    assert "tf-says-error" in stderr(log.format("error", "error"))

"""Config: params.yaml is what conf/ composes to; overrides; one-line errors; dvc.yaml params lists."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO
from xfer import XferError
from xfer.core import signals
from xfer.core.config import choices, compose_conf, load_params, repo_root, run_cli
from xfer.core.params import composed_yaml


def test_params_yaml_is_what_dvc_composes(tmp_path):
    """The committed params.yaml must equal what `dvc exp run` writes from conf/ (DVC's own composer)."""
    from dvc.utils.hydra import compose_and_dump

    out = tmp_path / "params.yaml"
    compose_and_dump(out, str(REPO / "conf"), None, "config", str(tmp_path), [])
    committed = (REPO / "params.yaml").read_text()
    assert committed == out.read_text(), "params.yaml is stale: run `xfer params`"
    assert composed_yaml([]) == committed


def test_hydra_composition_enabled_in_dvc_config():
    text = (REPO / ".dvc" / "config").read_text()
    assert "[hydra]" in text and "enabled = true" in text


def test_defaults_and_demo_preset():
    cfg = compose_conf([])
    assert (cfg.data.name, cfg.backbone.name, cfg.backbone.weights) == ("petimages", "vgg16", "imagenet")
    demo = compose_conf(["experiment=demo"])
    assert demo.data.kind == "synthetic" and demo.backbone.weights is None
    assert demo.backbone.image_size < cfg.backbone.image_size


def test_offline_presets_use_real_weights_from_their_backbone_folder():
    mobile = compose_conf(["experiment=mobilenet-offline"])
    assert (mobile.backbone.constructor, mobile.backbone.kwargs.alpha, mobile.backbone.image_size) == \
        ("MobileNet", 0.25, 320)  # the best recipe of the README's table, above the weights' native 224 px
    assert (mobile.head.pooling, mobile.head.label_smoothing, list(mobile.evaluate.tta)) == ("gap", 0.1, [])
    assert mobile.finetune.enabled is False
    assert mobile.backbone.weights == "weights/mobilenet/mobilenet_2_5_224_tf_no_top.h5"
    vgg = compose_conf(["experiment=vgg16-offline"])
    assert vgg.backbone.weights.startswith("weights/vgg16/") and vgg.backbone.weights.endswith(".weights.h5")
    assert (vgg.backbone.feature_layer, vgg.backbone.unfreeze_from) == ("block4_pool", "block4_conv1")


def test_stage_overrides_reach_the_config(project):
    cfg = load_params(["head.units=128", "backbone=resnet50v2", "backbone.weights=null"])
    assert cfg.head.units == 128
    assert cfg.backbone.constructor == "ResNet50V2" and cfg.backbone.weights is None
    assert load_params([]).head.units == 256  # params.yaml itself untouched


def test_hand_edits_of_params_yaml_are_read(project):
    text = (project / "params.yaml").read_text().replace("units: 256", "units: 77")
    (project / "params.yaml").write_text(text)
    assert load_params([]).head.units == 77


@pytest.mark.parametrize("override, expected", [
    (["backbone=nope"], "valid choices: efficientnetv2b0, inceptionv3, mobilenet, mobilenetv2, resnet50v2, vgg16"),
    (["head.nope=3"], "head.nope: no such key in params.yaml; valid keys at head: name, pooling, units"),
    (["data=archive"], "'data.url' must be set"),
])
def test_bad_overrides_fail_in_one_line_without_loading_tensorflow(project, capsys, override, expected):
    def stage(cfg):
        return cfg.data.url  # only the ??? case gets this far

    with pytest.raises(SystemExit) as exc:
        run_cli(stage, override)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and expected in err


PROBE = """
import runpy, sys
sys.argv = ["featurize", "backbone=nope"]
try:
    runpy.run_module("stages.featurize", run_name="__main__")
except SystemExit as exc:
    print(exc.code, "tensorflow" in sys.modules)
"""


def test_unknown_choice_from_the_command_line_is_one_line_and_never_loads_tensorflow():
    """The error comes before any heavy import (so well under 2 s), as one line, no traceback."""
    proc = subprocess.run([sys.executable, "-c", PROBE], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.stdout.split() == ["2", "False"]
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert "backbone=nope" in proc.stderr and "vgg16" in proc.stderr


FAST_EXIT_STAGE = """
import atexit, sys
from xfer.core.config import run_cli

def main(cfg):
    atexit.register(lambda: print("teardown ran", flush=True))
    print("stage output", cfg.head.units)  # block-buffered into the pipe: must be flushed before the exit
    print("stage note", file=sys.stderr)

if __name__ == "__main__":
    run_cli(main)
"""


@pytest.mark.parametrize("fast", ["1", "0"])
def test_a_finished_stage_process_skips_the_interpreter_teardown(tmp_path, fast):
    """A stage run as a script ends with os._exit after flushing: exit 0, every printed line there, but no
    teardown (an atexit handler does not run); XFER_FAST_EXIT=0 exits normally."""
    script = tmp_path / "stage.py"
    script.write_text(FAST_EXIT_STAGE)
    env = {**os.environ, "XFER_FAST_EXIT": fast, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, str(script)], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0 and proc.stdout.startswith("stage output 256\n") and "stage note" in proc.stderr
    assert ("teardown ran" in proc.stdout) == (fast == "0")


def test_key_missing_from_params_yaml_is_one_line(project, capsys):
    text = (project / "params.yaml").read_text().replace("  units: 256\n", "")
    (project / "params.yaml").write_text(text)

    def stage(cfg):
        return cfg.head.units

    with pytest.raises(SystemExit):
        run_cli(stage, [])
    err = capsys.readouterr().err
    assert err == "error: params.yaml: key 'head.units' is missing; restore it from conf/ (xfer params) " \
                  "or add it\n"


@pytest.mark.parametrize("library", ["converts", "swallows"])
@pytest.mark.parametrize("sig, code, word", [(signal.SIGTERM, 143, "terminated"), (signal.SIGINT, 130, "interrupted")])
def test_a_signal_that_a_library_converted_or_swallowed_still_ends_the_stage(project, capsys, monkeypatch,
                                                                               library, sig, code, word):
    """TensorFlow re-raises an exception thrown while it traces a function as its own ValueError, or drops it (both
    seen in CI): the stage still exits with the signal's code and one line, and commits no output."""
    from xfer.core.files import atomic_path

    def stage(cfg):
        with atomic_path(project / "out.txt") as tmp:
            tmp.write_text("complete, but the user asked to stop")
            try:
                os.kill(os.getpid(), sig)
                time.sleep(5)
            except KeyboardInterrupt:
                if library == "converts":
                    raise ValueError("Could not pack sequence") from None

    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal, even under a background CI job
    monkeypatch.setattr(signals, "received", [])
    try:
        with pytest.raises(SystemExit) as exc:
            run_cli(stage, [])
    finally:
        for s, handler in saved.items():
            signal.signal(s, handler)
    assert exc.value.code == code
    assert capsys.readouterr().err == f"{word}; partial outputs were discarded\n"
    assert sorted(p.name for p in project.iterdir() if "out.txt" in p.name) == []


def test_compose_rejects_unknown_group_choice():
    with pytest.raises(XferError, match="valid choices: .*petimages.*synthetic"):
        compose_conf(["data=nope"])


def test_params_cli_check_flags_a_stale_file(project, capsys):
    from xfer.core.params import main

    assert main(["--check"]) == 0
    (project / "params.yaml").write_text((project / "params.yaml").read_text().replace("seed: 42", "seed: 1"))
    assert main(["--check"]) == 2
    assert "differs" in capsys.readouterr().err


def test_missing_params_file_is_one_line(project):
    (project / "params.yaml").unlink()
    with pytest.raises(XferError, match="xfer params"):
        load_params([])


def test_repo_root_escapes_dvc_temp_experiments(tmp_path, monkeypatch):
    tmp_exp = tmp_path / "repo" / ".dvc" / "tmp" / "exps" / "tmpabc"
    tmp_exp.mkdir(parents=True)
    (tmp_exp / "dvc.yaml").write_text("stages: {}\n")
    monkeypatch.chdir(tmp_exp)
    monkeypatch.delenv("DVC_ROOT", raising=False)
    assert repo_root() == tmp_path / "repo"
    monkeypatch.setenv("DVC_ROOT", str(tmp_path / "elsewhere"))
    assert repo_root() == tmp_path / "elsewhere"


def test_dvc_yaml_declares_only_keys_that_exist_and_each_stage_script():
    dvc = yaml.safe_load((REPO / "dvc.yaml").read_text())
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    assert list(dvc["stages"]) == ["download", "split", "featurize", "audit", "views", "trunk", "train_head",
                                   "finetune", "evaluate", "scratch", "export"]
    # the audit reads features and the split, never a model: a head edit never reruns it
    audit = dvc["stages"]["audit"]
    assert not any(k.startswith(("head", "finetune")) for k in audit["params"])
    assert not any(d.startswith(("models/", "data/views", "data/trunk")) for d in audit["deps"])
    # the from-scratch baseline reads the split only: a backbone, head or fine-tuning change never reruns it
    scratch = dvc["stages"]["scratch"]
    assert not any(k.startswith(("backbone", "head", "finetune", "featurize")) for k in scratch["params"])
    assert not any(d.startswith(("data/features", "data/views", "data/trunk", "models/")) for d in scratch["deps"])
    for name, stage in dvc["stages"].items():
        assert stage["cmd"] == f"python -m stages.{name}"
        assert f"stages/{name}.py" in stage["deps"]
        for key in stage["params"]:
            node = params
            for part in key.split("."):
                assert part in node, f"{name}: param {key} not in params.yaml"
                node = node[part]
    # no stage depends on a run record (reports/runs/: a run id, new on every run): forcing a stage to rerun with
    # the same outputs (`dvc repro -f -s <stage>`) must leave `dvc status` clean
    for name, stage in dvc["stages"].items():
        assert not [d for d in stage["deps"] if str(d).startswith("reports/runs/")], name
    # only split lists the image tree; the stages after it read images through its manifests (path and sha256 of
    # every image: an edited photo reaches them through split), so DVC hashes the tree once per run
    assert [n for n, st in dvc["stages"].items() if "data/raw" in st["deps"]] == ["split"]
    for name in ("featurize", "audit", "views", "trunk", "finetune", "evaluate", "scratch", "export"):
        assert "data/splits" in dvc["stages"][name]["deps"], name
    # a head edit must not touch the upstream stages
    for upstream in ("download", "split", "featurize"):
        assert not any(k.startswith("head") for k in dvc["stages"][upstream]["params"])
    assert Path(REPO / "mlruns" / ".gitignore").is_file()
    # featurize depends on the weights of its own backbone only, and every backbone has that folder
    assert "weights/${backbone.name}" in dvc["stages"]["featurize"]["deps"]
    assert "weights" not in dvc["stages"]["featurize"]["deps"]
    for name in choices("backbone", REPO):
        assert (REPO / "weights" / name).is_dir(), f"weights/{name}/ missing (a featurize dependency)"
    # the augmented views are their own stage: changing K or the augmentation does not rerun featurize
    assert not any(k.startswith(("featurize.train_views", "finetune")) for k in dvc["stages"]["featurize"]["params"])

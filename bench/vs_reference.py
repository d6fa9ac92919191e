"""Benchmark: the pipeline against the book's recipe as a plain script, same split, same weights, same machine.

usage: python bench/vs_reference.py ARCHIVE WEIGHTS REFERENCE_SCRIPT [--seeds 1 2 3] [--split 500 150 400]
           [--preset mobilenet-offline] [--ref-finetune-epochs 10] [--work DIR] [OVERRIDE ...]
e.g.   python bench/vs_reference.py ../shared/data/petimages-dev.zip \\
           ../shared/data/weights/mobilenet_2_5_224_tf_no_top.h5 ../shared/tools/reference_recipe.py
A copy of the project in --work downloads and splits the archive once (per-class train/val/test counts, seed 42);
the reference reads the same split through symlinks. Then, per seed, the pipeline's featurize -> views ->
train_head -> finetune -> evaluate run as `python -m stages.<stage> seed=<s> OVERRIDE ...` (wall time summed),
and the reference script runs once (its own seed is fixed). Prints test accuracy (mean ± std) and wall time of
each, their ratios against the goal (accuracy >= reference fine-tuned + 1.5 points at <= 0.5x its wall time),
and the CPU. Nothing here is part of the pipeline: the reference script is only run, never imported.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from determinism import cpu  # noqa: E402

PROJECT = ["dvc.yaml", "params.yaml", "pyproject.toml", "conf", "stages", "xfer", "weights"]
STAGES = ["featurize", "views", "trunk", "train_head", "finetune", "evaluate"]


def sh(cmd: list[str], cwd: Path, env: dict) -> tuple[str, float]:
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return proc.stdout, time.perf_counter() - start


def prepare(args) -> tuple[Path, dict]:
    """A copy of the project in ``args.work``, downloaded and split per ``args``; the environment for its stages
    (no DVC/XFER variables, its own MLflow database in ``args.work``) and the reference's symlinked folders."""
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DVC_", "XFER_"))}
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{(work / 'mlflow.db').resolve()}"
    proj = work / "proj"
    if proj.exists():
        shutil.rmtree(proj)
    proj.mkdir(parents=True)
    for name in PROJECT:
        src = ROOT / name
        (shutil.copytree if src.is_dir() else shutil.copy2)(src, proj / name)
    composed = [f"experiment={args.preset}", f"data.url={Path(args.archive).resolve()}",
                f"split.train={args.split[0]}", f"split.val={args.split[1]}", f"split.test={args.split[2]}"]
    sh([sys.executable, "-m", "xfer", "params", *composed], proj, env)
    from omegaconf import OmegaConf

    target = proj / OmegaConf.load(proj / "params.yaml").backbone.weights
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(args.weights, target)
    for stage in ("download", "split"):
        sh([sys.executable, "-m", f"stages.{stage}"], proj, env)
    ref = work / "refdata"  # image_dataset_from_directory layout, symlinks to the split's images
    if ref.exists():
        shutil.rmtree(ref)
    import pandas as pd

    for split, folder in (("train", "train"), ("val", "validation"), ("test", "test")):
        manifest = pd.read_csv(proj / f"data/splits/{split}.csv")
        for path, cls in zip(manifest["path"], manifest["class"], strict=True):
            link = ref / folder / cls / Path(path).name
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to((proj / "data/raw/images" / path).resolve())
    return proj, env


def run_pipeline(proj: Path, seed: int, overrides: list[str], env: dict) -> dict:
    """featurize -> ... -> evaluate as separate processes; test accuracies and summed wall time."""
    env = {**env, "XFER_PIPELINE_ID": f"bench-seed{seed}"}
    times = {s: sh([sys.executable, "-m", f"stages.{s}", f"seed={seed}", *overrides], proj, env)[1] for s in STAGES}
    wall = sum(times.values())
    m = json.loads((proj / "reports/metrics/evaluate.json").read_text())
    print(f"pipeline  seed {seed}: head {m['head_test_accuracy']:.4f}, final {m['test_accuracy']:.4f}, "
          f"{wall:.0f} s (" + ", ".join(f"{s} {t:.0f} s" for s, t in times.items()) + ")", flush=True)
    return {"seed": seed, "head": m["head_test_accuracy"], "final": m["test_accuracy"], "wall_s": wall}


def run_reference(args, env: dict, *extra: str) -> dict:
    """The reference script on the split's symlinked folders; its accuracies, phases and wall time."""
    out, wall = sh([sys.executable, args.reference, str(args.work / "refdata"), str(Path(args.weights).resolve()),
                    "--backbone", args.ref_backbone, "--size", str(args.ref_size),
                    "--finetune-epochs", str(args.ref_finetune_epochs), *extra], args.work, env)
    r = json.loads(out.strip().splitlines()[-1])
    phases = ", ".join(f"{k} {v:.0f} s" for k, v in r.items() if k.endswith("_s") and not k.endswith("img_s"))
    print(f"reference: feature extraction {r['fe_test_acc']:.4f}, fine-tuned {r.get('ft_test_acc', 0):.4f}, "
          f"{wall:.0f} s ({phases})", flush=True)
    return {**r, "head": r["fe_test_acc"], "final": r.get("ft_test_acc"), "wall_s": wall}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("archive")
    ap.add_argument("weights")
    ap.add_argument("reference")
    ap.add_argument("overrides", nargs="*", help="params for the pipeline run, e.g. evaluate.tta=[flip]")
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--split", type=int, nargs=3, default=[500, 150, 400], metavar=("TRAIN", "VAL", "TEST"))
    ap.add_argument("--preset", default="mobilenet-offline")
    ap.add_argument("--ref-backbone", default="mobilenet025")
    ap.add_argument("--ref-size", type=int, default=224)
    ap.add_argument("--ref-finetune-epochs", type=int, default=10)
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "xfer-vs-reference")
    args = ap.parse_intermixed_args()
    args.reference = str(Path(args.reference).resolve())
    proj, env = prepare(args)
    ours, theirs = [], []
    for seed in args.seeds:
        ours.append(run_pipeline(proj, seed, args.overrides, env))
        theirs.append(run_reference(args, env))

    def stats(rows, key):
        values = [r[key] for r in rows]
        return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0

    print(f"\nsplit per class {args.split} (train/val/test), {len(args.seeds)} seeds; pipeline: "
          f"experiment={args.preset} {' '.join(args.overrides)}; reference: --finetune-epochs "
          f"{args.ref_finetune_epochs}")
    print("| | head / feature extraction | fine-tuned | wall time featurize→evaluate |")
    print("|---|---|---|---|")
    for name, rows in (("pipeline", ours), ("reference", theirs)):
        (h, hs), (f, fs), (w, ws) = stats(rows, "head"), stats(rows, "final"), stats(rows, "wall_s")
        print(f"| {name} | {h:.4f} ± {hs:.4f} | {f:.4f} ± {fs:.4f} | {w:.0f} ± {ws:.0f} s |")
    gain = (stats(ours, "final")[0] - stats(theirs, "final")[0]) * 100
    ratio = stats(ours, "wall_s")[0] / stats(theirs, "wall_s")[0]
    print(f"accuracy gain {gain:+.2f} points (goal >= +1.5), wall-time ratio {ratio:.2f} = {1 / ratio:.2f}x faster "
          f"(goal <= 0.5): {'MET' if gain >= 1.5 and ratio <= 0.5 else 'NOT MET'}")
    print(f"CPU: {cpu()}")


if __name__ == "__main__":
    main()

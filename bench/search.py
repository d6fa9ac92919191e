"""Benchmark: `xfer search` against the preset it starts from, on a real archive and real weights.

usage: python bench/search.py ARCHIVE WEIGHTS [--split 500 150 400] [--preset mobilenet-offline] [--seeds 42 1 2]
           [--trials 30] [--space default] [--work DIR] [OVERRIDE ...]
e.g.   python bench/search.py ../shared/data/petimages-dev.zip ../shared/data/weights/mobilenet_2_5_224_tf_no_top.h5
       python bench/search.py ARCHIVE WEIGHTS --space finetune --trials 10    # head + fine-tuning trials
       python bench/search.py ../shared/data/intel-scenes-dev.zip WEIGHTS --split 0.6 0.2 0.2 data=archive
A copy of the project in --work downloads, splits and featurizes the archive once (seed 42). `xfer search` then runs
its trials (wall time measured, as is the CPU time of the process, to judge a shared machine; each trial's seconds
as it printed them); the best trial (adopted by the significance rule or not: the report says which) and the
starting preset are each trained and evaluated per seed (`python -m stages.<stage> seed=<s>` for trunk, train_head,
finetune, evaluate: the test set is read only here). Prints test accuracy and ECE (calibrated, and before
calibration) mean ± std for both, and the search's figures.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from determinism import cpu  # noqa: E402
from vs_reference import sh  # noqa: E402

TRAIN = ["trunk", "train_head", "finetune", "evaluate"]  # trunk: instant unless the model fine-tunes on its views
QUIET = ["evaluate.register=false", "evaluate.misclassified=0", "evaluate.correct_per_class=0"]


def prepare(args) -> tuple[Path, dict]:
    import os
    import shutil

    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DVC_", "XFER_"))}
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{(work / 'mlruns' / 'mlflow.db').resolve()}"
    (work / "mlruns").mkdir(exist_ok=True)
    proj = work / "proj"
    env["PYTHONPATH"] = str(proj.resolve())  # the copy's code, whatever happens to the worktree meanwhile
    if proj.exists():
        shutil.rmtree(proj)
    proj.mkdir(parents=True)
    for name in ["dvc.yaml", "params.yaml", "pyproject.toml", "conf", "stages", "xfer", "weights"]:
        src = ROOT / name
        (shutil.copytree if src.is_dir() else shutil.copy2)(src, proj / name)
    composed = [f"experiment={args.preset}", f"data.url={Path(args.archive).resolve()}",
                f"split.train={args.split[0]}", f"split.val={args.split[1]}", f"split.test={args.split[2]}",
                *args.overrides]
    sh([sys.executable, "-m", "xfer", "params", *composed], proj, env)
    from omegaconf import OmegaConf

    target = proj / OmegaConf.load(proj / "params.yaml").backbone.weights
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(args.weights, target)
    for stage in ("download", "split", "featurize", "views", "trunk"):
        sh([sys.executable, "-m", f"stages.{stage}"], proj, env)
    return proj, env


def scores(proj: Path, env: dict, seeds: list[int], overrides: list[str]) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {"test_accuracy": [], "test_ece": [], "test_ece_uncalibrated": [], "temperature": []}
    for seed in seeds:
        for stage in TRAIN:
            sh([sys.executable, "-m", f"stages.{stage}", f"seed={seed}", *QUIET, *overrides], proj, env)
        m = json.loads((proj / "reports/metrics/evaluate.json").read_text())
        for key in out:
            out[key].append(m[key])
    return out


def trial_seconds(out: str) -> dict[str, list[float]]:
    """Each trial's seconds from the search's lines (``trial N: ... (S s) key=value ...``), by kind."""
    import re

    kinds: dict[str, list[float]] = {"complete": [], "complete, fine-tuned": [], "complete, head only": [],
                                     "pruned": []}
    for m in re.finditer(r"^trial \d+: (.*?) \(([\d.]+) s\)(.*)$", out, re.M):
        what, secs, point = m.groups()
        kind = "pruned" if what.startswith("pruned") else "complete, fine-tuned" if "finetune.enabled=True" in point \
            else "complete, head only" if "finetune.enabled=False" in point else "complete"
        kinds[kind].append(float(secs))
    return kinds


def shown(values: list[float], scale: float = 1.0, digits: int = 1) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values) * scale:.{digits}f} ± {sd * scale:.{digits}f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("archive")
    ap.add_argument("weights")
    ap.add_argument("--split", nargs=3, default=["500", "150", "400"])
    ap.add_argument("--preset", default="mobilenet-offline")
    ap.add_argument("--seeds", nargs="+", type=int, default=[42, 1, 2])
    ap.add_argument("--trials", type=int, default=30)
    ap.add_argument("--space", default="default")
    ap.add_argument("--timeout", type=float, default=None, help="the search's --timeout (seconds)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/xfer-bench-search"))
    ap.add_argument("--reuse", action="store_true", help="keep --work's prepared project (features cached)")
    ap.add_argument("overrides", nargs="*", help="params overrides for the project, e.g. data=archive")
    args = ap.parse_intermixed_args()
    if args.reuse and (args.work / "proj/data/features").is_dir():
        import os

        proj = args.work / "proj"
        env = {k: v for k, v in os.environ.items() if not k.startswith(("DVC_", "XFER_"))}
        env["MLFLOW_TRACKING_URI"] = f"sqlite:///{(args.work / 'mlruns' / 'mlflow.db').resolve()}"
        env["PYTHONPATH"] = str(proj.resolve())
    else:
        proj, env = prepare(args)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    budget = ["--trials", str(args.trials), *(["--timeout", str(args.timeout)] if args.timeout else [])]
    out, _ = sh([sys.executable, "-m", "xfer", "search", args.space, *budget, "--name", "bench"], proj, env)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu_s = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    print("\n".join(line for line in out.splitlines() if line.startswith(("search:", "baseline"))))
    trials = trial_seconds(out)
    report = json.loads(next((proj / "reports/search").glob("*.json")).read_text())
    preset = scores(proj, env, args.seeds, [])
    winner = report.get("winner_values", report["preset_values"])
    searched = scores(proj, env, args.seeds, [f"{k}={json.dumps(v) if isinstance(v, list) else v}"
                                              for k, v in winner.items()])
    print(f"\n{args.archive}, split {'/'.join(args.split)}, {args.preset}; seeds {args.seeds}; CPU: {cpu()}")
    for kind, secs in trials.items():
        if secs:
            print(f"trial seconds, {kind}: mean {statistics.mean(secs):.1f}, min {min(secs):.1f}, max {max(secs):.1f}"
                  f" ({len(secs)} trials)")
    verdict = "adopted" if report.get("adopted") else "not adopted (the search's preset keeps the starting params)"
    print(f"winner: {winner}; {verdict}")
    trials = report["trials_complete"] + report["trials_pruned"]
    print(f"search: {trials} trials ({report['trials_complete']} complete, {report['trials_pruned']} pruned) in "
          f"{wall:.0f} s wall, {cpu_s:.0f} s CPU (process and children); CV gain {report['gain'] * 100:+.2f} ± "
          f"{report['gain_std'] * 100:.2f} points over {report['folds']} folds; winner {report['preset_values']}")
    print("| model | test accuracy % | ECE (calibrated) | ECE before calibration | temperature |")
    print("|---|---|---|---|---|")
    for name, s in (("preset", preset), ("searched", searched)):
        print(f"| {name} | {shown(s['test_accuracy'], 100)} | {shown(s['test_ece'], 1, 3)} | "
              f"{shown(s['test_ece_uncalibrated'], 1, 3)} | {shown(s['temperature'], 1, 2)} |")


if __name__ == "__main__":
    main()

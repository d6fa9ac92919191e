"""Benchmark: the daily loop. Edit `head.units` in params.yaml, run `dvc repro`: how much of the wall time is the
stages' work and how much is start-up (imports, MLflow set-up, parent refresh) and DVC's own checks?

usage: python bench/inner_loop.py ARCHIVE MOBILENET_WEIGHTS [--before REV] [--after REV] [--repeats 3]
           [--split 500 150 400] [--preset mobilenet-offline] [--work DIR]
e.g.   python bench/inner_loop.py ../shared/data/petimages-dev.zip \\
           ../shared/data/weights/mobilenet_2_5_224_tf_no_top.h5 --before 13be3a4
Each revision (default: --before HEAD~1, --after the working tree) becomes its own git + DVC repository in --work
with the preset composed for the archive; both run the whole `dvc repro` once, then --repeats times, alternating
the two, head.units flips between 128 and 256 and `dvc repro` reruns train_head, finetune and evaluate. Work is
the time each stage spent inside its MLflow run (reports/runs/<stage>.json `seconds`); overhead is the wall time
of `dvc repro` minus that. Prints medians per revision and the CPU; run it on an otherwise idle
machine. A revision with warm starts (xfer.core.warm) keeps its warm processes in --work/warm, stopped at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from io import BytesIO
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from determinism import cpu  # noqa: E402

GIT = ["git", "-c", "user.name=bench", "-c", "user.email=bench@example.com"]


def sh(cmd: list[str], cwd: Path, env: dict) -> tuple[str, float]:
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed in {cwd}:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    return proc.stdout + proc.stderr, time.perf_counter() - start


def checkout(rev: str | None, dest: Path) -> None:
    """The project at ``rev`` (``None``: the working tree's tracked files) in ``dest``."""
    dest.mkdir(parents=True)
    if rev is None:
        files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
        for name in filter(None, files.decode().split("\0")):
            src, dst = ROOT / name, dest / name
            if src.is_file():
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, dst)
        return
    tar = subprocess.run(["git", "archive", rev], cwd=ROOT, capture_output=True, check=True).stdout
    with tarfile.open(fileobj=BytesIO(tar)) as archive:
        archive.extractall(dest, filter="data")


def prepare(rev: str | None, proj: Path, args, env: dict) -> float:
    """A git + DVC repository of ``rev`` with the preset composed; returns the first full `dvc repro`'s wall."""
    checkout(rev, proj)
    (proj / "weights" / "mobilenet").mkdir(parents=True, exist_ok=True)
    shutil.copy2(args.weights, proj / "weights" / "mobilenet" / Path(args.weights).name)
    composed = [f"experiment={args.preset}", f"data.url={Path(args.archive).resolve()}",
                f"split.train={args.split[0]}", f"split.val={args.split[1]}", f"split.test={args.split[2]}"]
    old = not (proj / "xfer" / "cli.py").is_file()  # before the `xfer` command
    sh([sys.executable, "-m", "xfer.params" if old else "xfer", *([] if old else ["params"]), *composed], proj, env)
    sh(["git", "init", "-q", "-b", "main"], proj, env)
    sh([*GIT, "add", "-A"], proj, env)
    sh([*GIT, "commit", "-qm", "bench"], proj, env)
    _, wall = sh([sys.executable, "-m", "dvc", "repro"], proj, env)
    return wall


def work_seconds(proj: Path, stages: list[str]) -> float:
    return sum(json.loads((proj / "reports" / "runs" / f"{s}.json").read_text()).get("seconds", 0.0) for s in stages)


def stage_seconds(proj: Path, stages: list[str]) -> dict[str, float]:
    return {s: json.loads((proj / "reports" / "runs" / f"{s}.json").read_text()).get("seconds", 0.0) for s in stages}


def has_export(proj: Path) -> bool:
    return "\n  export:\n" in (proj / "dvc.yaml").read_text()


def repro_timed(proj: Path, env: dict) -> tuple[float, dict[str, float]]:
    """`dvc repro`'s wall time and each rerun stage's share of it: from DVC's "Running stage" line to the next one
    (the last: to the end), so DVC's own bookkeeping of a stage counts with it."""
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "dvc", "repro"], cwd=proj, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    marks, log = [], []
    for line in proc.stdout:
        log.append(line)
        if found := re.match(r"Running stage '(\w+)'", line):
            marks.append((found.group(1), time.perf_counter()))
    proc.wait()
    end = time.perf_counter()
    if proc.returncode:
        raise SystemExit(f"dvc repro failed in {proj}:\n{''.join(log)[-4000:]}")
    walls = {name: (marks[i + 1][1] if i + 1 < len(marks) else end) - t for i, (name, t) in enumerate(marks)}
    return end - start, walls


def edit_and_repro(proj: Path, units: int, env: dict) -> tuple[float, float, list[str], dict[str, float]]:
    params = proj / "params.yaml"
    params.write_text(re.sub(r"(?m)^  units: \d+$", f"  units: {units}", params.read_text(), count=1))
    wall, walls = repro_timed(proj, env)
    ran = list(walls)
    return wall, work_seconds(proj, ran), ran, walls


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("archive")
    ap.add_argument("weights")
    ap.add_argument("--before", default="HEAD~1")
    ap.add_argument("--after", default=None, help="a git revision (default: the working tree)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--split", type=int, nargs=3, default=[500, 150, 400])
    ap.add_argument("--preset", default="mobilenet-offline")
    ap.add_argument("--work", type=Path, default=None)
    args = ap.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="xfer-inner-loop-"))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DVC_", "XFER_", "MLFLOW_", "PYTHONPATH"))}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["DVC_NO_ANALYTICS"] = "1"
    env["XFER_WARM_DIR"] = str(work / "warm")  # the bench's own warm processes (xfer.core.warm), stopped at the end
    revs = {"before": args.before, "after": args.after}
    projects = {name: work / name for name in revs}
    full = {}
    for name, rev in revs.items():
        full[name] = prepare(rev, projects[name], args, env)
        stages = [p.stem for p in (projects[name] / "reports" / "runs").glob("*.json")]
        full[name] = (full[name], work_seconds(projects[name], stages))
    loops: dict[str, list[tuple[float, float]]] = {name: [] for name in revs}
    per_stage: dict[str, list[dict[str, float]]] = {name: [] for name in revs}
    stage_walls: dict[str, list[dict[str, float]]] = {name: [] for name in revs}
    for i in range(args.repeats):
        for name in revs:  # alternate, so a busy moment hits both alike
            wall, busy, ran, walls = edit_and_repro(projects[name], 128 if i % 2 == 0 else 256, env)
            expected = ["train_head", "finetune", "evaluate"] + (["export"] if has_export(projects[name]) else [])
            if ran != expected:
                raise SystemExit(f"{name}: the edit reran {ran}, not {', '.join(expected)}")
            loops[name].append((wall, busy))
            per_stage[name].append(stage_seconds(projects[name], ran))
            stage_walls[name].append(walls)
    print(f"{cpu()}; {args.preset} on {Path(args.archive).name}, split {'/'.join(map(str, args.split))} per class, "
          f"{args.repeats} edit-and-rerun rounds (median)")
    print(f"{'revision':<22} {'full repro':>10} {'its overhead':>13} {'edit+repro':>11} {'work':>6} {'overhead':>9}")
    for name, rev in revs.items():
        wall = statistics.median(w for w, _ in loops[name])
        busy = statistics.median(b for _, b in loops[name])
        label = f"{name} ({rev or 'working tree'})"
        print(f"{label:<22} {full[name][0]:9.1f}s {full[name][0] - full[name][1]:12.1f}s {wall:10.1f}s "
              f"{busy:5.1f}s {wall - busy:8.1f}s")
    for name in revs:
        stages = per_stage[name][0]
        print(f"{name} per stage, median s (wall in dvc repro / work inside the MLflow run / overhead): " + ", ".join(
            f"{s} {statistics.median(w[s] for w in stage_walls[name]):.1f} / "
            f"{statistics.median(r[s] for r in per_stage[name]):.1f} / "
            f"{statistics.median(w[s] - r[s] for w, r in zip(stage_walls[name], per_stage[name], strict=True)):.1f}"
            for s in stages))
    for proj in projects.values():
        if (proj / "xfer" / "core" / "warm.py").is_file():
            subprocess.run([sys.executable, "-m", "xfer", "warm", "stop"], cwd=proj, env=env, capture_output=True)
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

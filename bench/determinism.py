"""Benchmark: the cost of TensorFlow op determinism (runtime.deterministic) on a fine-tuning epoch.

usage: python bench/determinism.py [--train 320] [--val 160] [--size 180] [--backbone vgg16] [--rounds 2]
Runs bench/finetune_epoch.py in fresh processes, alternating off/on, and reports the best epoch time of each
and their ratio, with the CPU it ran on (model name and the flags that matter to TensorFlow).
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")


def cpu() -> str:
    info = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    model = re.search(r"Model name:\s*(.+)", info)
    flags = set(re.search(r"Flags:\s*(.+)", info).group(1).split()) if "Flags:" in info else set()
    return f"{model.group(1).strip() if model else '?'}; flags: {' '.join(f for f in FLAGS if f in flags) or '-'}"


def epoch_seconds(args, deterministic: bool) -> float:
    cmd = [sys.executable, str(HERE / "finetune_epoch.py"), "--train", str(args.train), "--val", str(args.val),
           "--size", str(args.size), "--backbone", args.backbone] + (["--deterministic"] if deterministic else [])
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return float(re.search(r"epoch total\s+(\d+(?:\.\d+)?) s", out).group(1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train", type=int, default=320)
    ap.add_argument("--val", type=int, default=160)
    ap.add_argument("--size", type=int, default=180)
    ap.add_argument("--backbone", default="vgg16")
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    times: dict[bool, list[float]] = {False: [], True: []}
    for _ in range(args.rounds):
        for deterministic in (False, True):
            times[deterministic].append(epoch_seconds(args, deterministic))
            print(f"deterministic={deterministic}: {times[deterministic][-1]:.1f} s", flush=True)
    off, on = min(times[False]), min(times[True])
    print(f"{args.backbone} {args.size}px, {args.train} train + {args.val} val images, best of {args.rounds}: "
          f"off {off:.1f} s, on {on:.1f} s, on/off = {on / off:.3f}")
    print(f"CPU: {cpu()}")


if __name__ == "__main__":
    main()

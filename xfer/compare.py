"""Leaderboard of the pipeline runs in MLflow: which backbone and settings give the best model?

usage: python -m xfer.compare [--experiment petimages] [--per-run] [--per-backbone] [--out reports/compare]
Writes leaderboard.md, leaderboard.csv and leaderboard.png (test accuracy, with the spread over seeds) and prints
the Markdown. Pipelines that share every parameter except `seed` form one row: mean ± std over their seeds and
the number of seeds (run them with `dvc exp run --queue -S seed=1,2,3`). --per-run lists each pipeline. The
evaluate run of a pipeline and the featurize, views, train_head and finetune runs it links to (upstream.* tags)
supply the parameters, images/s and training time.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

from xfer import XferError
from xfer.files import atomic_path, atomic_write_text

COLUMNS = ["backbone", "experiment", "test_accuracy", "test_auc", "test_f1_macro", "featurize_images_per_sec",
           "params", "training_time_s", "seed", "pipeline_id", "run_id"]
GROUPED = ["backbone", "experiment", "seeds", "test_accuracy", "test_accuracy_std", "test_auc", "test_f1_macro",
           "featurize_images_per_sec", "params", "training_time_s"]
MEANS = ["test_accuracy", "test_auc", "test_f1_macro", "featurize_images_per_sec", "params", "training_time_s"]


def _duration(run) -> float:
    return ((run.info.end_time or run.info.start_time) - run.info.start_time) / 1000 if run else float("nan")


def leaderboard(client, experiment: str) -> pd.DataFrame:
    """Rows of (backbone, metrics, speed, size, time, seed, config) for every finished evaluate run of
    ``experiment``; ``config`` identifies the parameters other than the seed."""
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        names = ", ".join(e.name for e in client.search_experiments()) or "none"
        raise XferError(f"no MLflow experiment '{experiment}'; experiments here: {names}")
    runs = client.search_runs([exp.experiment_id], "tags.stage = 'evaluate' and attributes.status = 'FINISHED'")

    def linked(run, stage):
        run_id = run.data.tags.get(f"upstream.{stage}") if run else None
        return client.get_run(run_id) if run_id else None

    rows, configs = [], []
    for ev in runs:
        finetune, head = linked(ev, "finetune"), linked(ev, "train_head")
        featurize = linked(finetune, "featurize") or linked(head, "featurize")
        params = {}
        for r in (featurize, linked(head, "views"), linked(finetune, "trunk"), head, finetune, ev):
            params.update(r.data.params if r else {})
        seed = params.pop("seed", None)
        configs.append(repr(sorted(params.items())))
        m = ev.data.metrics
        rows.append({
            "backbone": ev.data.tags.get("backbone", "?"),
            "experiment": ev.data.tags.get("dvc_exp_name") or "-",
            "test_accuracy": m.get("test_accuracy"), "test_auc": m.get("test_auc"),
            "test_f1_macro": m.get("test_f1_macro"),
            "featurize_images_per_sec": featurize.data.metrics.get("images_per_sec") if featurize else None,
            "params": m.get("model_params"),
            "training_time_s": round(_duration(head) + _duration(finetune), 1), "seed": seed,
            "pipeline_id": ev.data.tags.get("pipeline_id", ""), "run_id": ev.info.run_id,
        })
    frame = pd.DataFrame(rows, columns=COLUMNS)
    frame["config"] = configs
    return frame.sort_values("test_accuracy", ascending=False, kind="stable").reset_index(drop=True)


def by_config(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per set of parameters (all but the seed): means over its seeds, the accuracy's standard
    deviation (0 for a single seed) and the number of seeds; best mean accuracy first."""
    rows = []
    for _, group in frame.groupby("config", sort=False):
        row = {"backbone": group["backbone"].iloc[0],
               "experiment": ", ".join(sorted({e for e in group["experiment"] if e != "-"})) or "-",
               "seeds": group["seed"].nunique(dropna=False),
               "test_accuracy_std": float(group["test_accuracy"].std(ddof=1)) if len(group) > 1 else 0.0}
        row.update({c: float(pd.to_numeric(group[c]).mean()) for c in MEANS})
        rows.append(row)
    out = pd.DataFrame(rows, columns=GROUPED)
    return out.sort_values("test_accuracy", ascending=False, kind="stable").reset_index(drop=True)


def to_markdown(frame: pd.DataFrame) -> str:
    """The table (``test_accuracy`` shown as mean ± std when grouped)."""
    def cell(v) -> str:
        if isinstance(v, float) and v.is_integer() and abs(v) >= 10:
            return f"{int(v):,}"
        if isinstance(v, float):
            return f"{v:.4f}" if abs(v) < 10 else f"{v:,.1f}"
        return str(v)

    grouped = "seeds" in frame.columns
    cols = [c for c in frame.columns if c not in ("run_id", "config", "test_accuracy_std")]

    def value(r, c) -> str:
        if grouped and c == "test_accuracy":
            return f"{r[c]:.4f} ± {r['test_accuracy_std']:.4f}"
        return cell(r[c])

    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(value(r, c) for c in cols) + " |" for _, r in frame.iterrows()]
    return "\n".join(lines) + "\n"


def bar_chart(frame: pd.DataFrame, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{b}\n{e}" if e != "-" else b for b, e in zip(frame["backbone"], frame["experiment"], strict=True)]
    fig, ax = plt.subplots(figsize=(max(4, 1.2 * len(frame)), 3.5))
    spread = frame["test_accuracy_std"].astype(float) if "test_accuracy_std" in frame else None
    bars = ax.bar(labels, frame["test_accuracy"].astype(float), yerr=spread, capsize=4, color="tab:blue")
    ax.bar_label(bars, fmt="%.3f", fontsize=8, padding=2)
    ax.set_ylabel("test accuracy")
    ax.set_ylim(0, 1.05)
    ax.set_title("Backbone leaderboard")
    fig.tight_layout()
    with atomic_path(out) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m xfer.compare", description=__doc__.splitlines()[0])
    ap.add_argument("--experiment", default=None, help="MLflow experiment (default: data.name from params.yaml)")
    ap.add_argument("--per-backbone", action="store_true", help="keep only the best row of each backbone")
    ap.add_argument("--per-run", action="store_true", help="one row per pipeline run instead of per parameter set")
    ap.add_argument("--out", default="reports/compare", type=Path)
    args = ap.parse_args(argv)
    try:
        import mlflow

        from xfer.config import load_params
        from xfer.tracking import experiment_name, tracking_uri

        experiment = args.experiment or experiment_name(load_params([]))
        frame = leaderboard(mlflow.MlflowClient(tracking_uri()), experiment)
        if not args.per_run:
            frame = by_config(frame)
        if args.per_backbone:
            frame = frame.drop_duplicates("backbone", keep="first").reset_index(drop=True)
        if frame.empty:
            raise XferError(f"no finished evaluate runs in MLflow experiment '{experiment}'; run the pipeline first")
    except XferError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    markdown = to_markdown(frame)
    atomic_write_text(args.out / "leaderboard.md", markdown)
    with atomic_path(args.out / "leaderboard.csv") as tmp:
        frame.drop(columns=["config"], errors="ignore").to_csv(tmp, index=False, lineterminator="\n")
    bar_chart(frame, args.out / "leaderboard.png")
    print(markdown + f"\nwrote {args.out}/leaderboard.{{md,csv,png}}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

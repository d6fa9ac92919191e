"""Leaderboard of the pipeline runs in MLflow: which backbone and settings give the best model?

usage: xfer compare [--experiment petimages] [--per-run] [--per-model] [--out reports/compare]
Writes leaderboard.md, leaderboard.csv and leaderboard.png (test accuracy, with the spread over seeds) and prints
the Markdown. Rows are models: `<backbone>/head` (feature extraction), `<backbone>/finetuned` and
`scratch/<name>` (a baseline trained from scratch, `-S scratch=convnet`). Pipelines that share every parameter
except `seed` form one row per model: mean ± std over their seeds and the number of seeds (run them with
`dvc exp run --queue -S seed=1,2,3`). --per-run lists each pipeline's models. Each pipeline's parent MLflow run
supplies its rows (it also summarizes the stages DVC skipped as cached). The parameters whose values differ between
the listed rows follow as extra columns (as `dvc exp show --only-changed` shows them).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pandas as pd

from xfer import XferError
from xfer.core.args import Parser
from xfer.core.files import atomic_path, atomic_write_text

COLUMNS = ["model", "experiment", "test_accuracy", "test_auc", "test_f1_macro", "tta", "featurize_images_per_sec",
           "params", "training_time_s", "seed", "pipeline_id", "run_id"]
GROUPED = ["model", "experiment", "seeds", "test_accuracy", "test_accuracy_std", "test_auc", "test_f1_macro", "tta",
           "featurize_images_per_sec", "params", "training_time_s"]
MEANS = ["test_accuracy", "test_auc", "test_f1_macro", "featurize_images_per_sec", "params", "training_time_s"]


def model_rows(run) -> list[dict]:
    """The models one pipeline's parent run scored on the test images: ``<backbone>/head`` (the head on the
    cached features; when fine-tuning is off it is the final model), ``<backbone>/finetuned`` and
    ``scratch/<name>`` (the from-scratch baseline, when there is one). ``source`` is the stage run that produced
    the numbers (pipelines sharing a cached stage share it), ``config`` what groups seeds."""
    m, p, t = run.data.metrics, run.data.params, run.data.tags
    backbone, tta = p.get("backbone.name", t.get("backbone", "?")), _tta(p.get("evaluate.tta"))
    common = {"experiment": t.get("dvc_exp_name") or "-", "seed": p.get("seed"),
              "pipeline_id": t.get("pipeline_id", ""), "run_id": run.info.run_id}
    head_seconds = m.get("train_head_seconds", 0.0)
    tuned = str(p.get("finetune.enabled", "true")).lower() == "true"
    specs = [(f"{backbone}/head", "head_test_" if tuned else "test_", "none" if tuned else tta, head_seconds,
              t.get("stage.train_head" if tuned else "stage.evaluate"), t.get("config_digest")),
             (f"{backbone}/finetuned", "test_", tta, head_seconds + m.get("finetune_seconds", 0.0),
              t.get("stage.evaluate"), t.get("config_digest")) if tuned else None,
             (f"scratch/{p.get('scratch.name')}", "scratch_test_", tta, m.get("scratch_seconds", 0.0),
              t.get("stage.scratch"), t.get("scratch_config_digest"))]
    rows = []
    for model, prefix, row_tta, seconds, source, config in filter(None, specs):
        if f"{prefix}accuracy" not in m:
            continue
        scratch = model.startswith("scratch/")
        rows.append({"model": model, **common, "test_accuracy": m[f"{prefix}accuracy"],
                     "test_auc": m.get(f"{prefix}auc"), "test_f1_macro": m.get(f"{prefix}f1_macro"), "tta": row_tta,
                     "featurize_images_per_sec": None if scratch else m.get("featurize_images_per_sec"),
                     "params": m.get("scratch_model_params" if scratch else "model_params"),
                     "training_time_s": round(seconds, 1), "source": source or run.info.run_id,
                     "config": config or run.info.run_id, "settings": dict(p)})
    return rows


def _tta(param: str | None) -> str:
    try:
        views = json.loads(param) if param else []
    except ValueError:
        views = [param]
    return "+".join(views) or "none"


def leaderboard(client, experiment: str) -> pd.DataFrame:
    """One row per model each finished pipeline of ``experiment`` scored (:func:`model_rows`), from the parent
    runs (which also summarize the stages DVC skipped); a model several pipelines share through a cached stage is
    listed once. Best test accuracy first; ``config`` groups seeds."""
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        names = ", ".join(e.name for e in client.search_experiments()) or "none"
        raise XferError(f"no MLflow experiment '{experiment}'; experiments here: {names}")
    runs = client.search_runs([exp.experiment_id], "tags.role = 'pipeline' and attributes.status = 'FINISHED'",
                              max_results=5000)
    frame = pd.DataFrame([row for run in runs for row in model_rows(run)],
                         columns=[*COLUMNS, "source", "config", "settings"])
    shared = frame.groupby(["model", "source"])["experiment"]  # pipelines sharing a stage: one row, named by all
    frame["experiment"] = shared.transform(lambda e: ", ".join(sorted({x for x in e if x != "-"})) or "-")
    frame = frame.drop_duplicates(["model", "source"]).drop(columns="source")
    return frame.sort_values("test_accuracy", ascending=False, kind="stable").reset_index(drop=True)


def by_config(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per model and set of parameters (all but the seed): means over its seeds, the accuracy's standard
    deviation (0 for a single seed) and the number of seeds; best mean accuracy first."""
    rows = []
    for _, group in frame.groupby(["model", "config"], sort=False):
        row = {"model": group["model"].iloc[0], "tta": group["tta"].iloc[0],
               "experiment": ", ".join(sorted({x for e in group["experiment"] for x in e.split(", ") if x != "-"}))
               or "-",
               "seeds": group["seed"].nunique(dropna=False),
               "test_accuracy_std": float(group["test_accuracy"].std(ddof=1)) if len(group) > 1 else 0.0,
               "settings": group["settings"].iloc[0]}
        row.update({c: float(pd.to_numeric(group[c]).mean()) for c in MEANS})
        rows.append(row)
    out = pd.DataFrame(rows, columns=[*GROUPED, "settings"])
    return out.sort_values("test_accuracy", ascending=False, kind="stable").reset_index(drop=True)


def with_differences(frame: pd.DataFrame, ignore: tuple[str, ...] = ()) -> pd.DataFrame:
    """The frame with one column per parameter whose value differs between its rows (like ``dvc exp show
    --only-changed``), taken from each pipeline's parent-run params; ``ignore`` (e.g. ``seed`` when seeds are
    grouped) is left out. A parameter a pipeline did not log shows as ``-``."""
    settings = list(frame.pop("settings")) if "settings" in frame else []
    keys = sorted({k for s in settings for k in s} - set(ignore))
    changed = [k for k in keys if len({s.get(k) for s in settings}) > 1]
    for key in changed:
        frame[key] = [s.get(key, "-") for s in settings]
    return frame


FORMATS = {"test_accuracy": "{:.4f}", "test_accuracy_std": "{:.4f}", "test_auc": "{:.4f}", "test_f1_macro": "{:.4f}",
           "featurize_images_per_sec": "{:,.1f}", "params": "{:,.0f}", "training_time_s": "{:,.1f}"}


def to_markdown(frame: pd.DataFrame) -> str:
    """The table (``test_accuracy`` shown as mean ± std when grouped)."""
    def cell(v, column: str) -> str:
        if v is None or (isinstance(v, float) and v != v):
            return "-"
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return FORMATS.get(column, "{:g}").format(v)
        return str(v)

    grouped = "seeds" in frame.columns
    cols = [c for c in frame.columns if c not in ("run_id", "config", "test_accuracy_std")]

    def value(r, c) -> str:
        if grouped and c == "test_accuracy":
            return f"{r[c]:.4f} ± {r['test_accuracy_std']:.4f}"
        return cell(r[c], c)

    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(value(r, c) for c in cols) + " |" for _, r in frame.iterrows()]
    return "\n".join(lines) + "\n"


def bar_chart(frame: pd.DataFrame, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{b}\n{e}" if e != "-" else b for b, e in zip(frame["model"], frame["experiment"], strict=True)]
    fig, ax = plt.subplots(figsize=(max(4, 1.2 * len(frame)), 3.5))
    spread = frame["test_accuracy_std"].astype(float) if "test_accuracy_std" in frame else None
    bars = ax.bar(labels, frame["test_accuracy"].astype(float), yerr=spread, capsize=4, color="tab:blue")
    ax.bar_label(bars, fmt="%.3f", fontsize=8, padding=2)
    ax.set_ylabel("test accuracy")
    ax.set_ylim(0, 1.05)
    ax.set_title("Leaderboard")
    fig.tight_layout()
    with atomic_path(out) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = Parser(prog="xfer compare", description=__doc__.splitlines()[0])
    ap.add_argument("--experiment", default=None, help="MLflow experiment (default: data.name from params.yaml)")
    ap.add_argument("--per-model", action="store_true",
                    help="keep only the best row of each model (vgg16/head, vgg16/finetuned, scratch/convnet, ...)")
    ap.add_argument("--per-run", action="store_true", help="one row per pipeline run instead of per parameter set")
    ap.add_argument("--out", default="reports/compare", type=Path)
    args = ap.parse_args(argv)
    try:
        import mlflow

        from xfer.core.config import load_params
        from xfer.track.runs import experiment_name
        from xfer.track.store import check_server, tracking_uri
        from xfer.track.summary import view_url

        experiment = args.experiment or experiment_name(load_params([]))
        check_server(tracking_uri())
        client = mlflow.MlflowClient(tracking_uri())
        frame = leaderboard(client, experiment)
        url = view_url(client.get_experiment_by_name(experiment).experiment_id)
        if not args.per_run:
            frame = by_config(frame)
        if args.per_model:
            frame = frame.drop_duplicates("model", keep="first").reset_index(drop=True)
        frame = with_differences(frame, ignore=("seed",))
        if frame.empty:
            raise XferError(f"no finished pipeline with test metrics in MLflow experiment '{experiment}'; "
                            "run the pipeline first")
    except XferError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    markdown = to_markdown(frame)
    atomic_write_text(args.out / "leaderboard.md", markdown)
    with atomic_path(args.out / "leaderboard.csv") as tmp:
        frame.drop(columns=["config"], errors="ignore").to_csv(tmp, index=False, lineterminator="\n")
    bar_chart(frame, args.out / "leaderboard.png")
    print(markdown + f"\nwrote {args.out}/leaderboard.{{md,csv,png}}\nin the MLflow UI (mlflow ui / server): {url}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

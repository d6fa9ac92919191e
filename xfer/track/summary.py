"""The parent MLflow run of one pipeline execution: every stage run is nested under it, and it holds what a
comparison needs — key params, final metrics, each stage's wall time, links to the runs of stages DVC skipped,
the data splits as MLflow datasets.

The first stage of a ``dvc repro``/``dvc exp run`` creates it; every stage refreshes it when it ends. Only
*settled* stages are summarized: the stages that ran in this execution, and the stages upstream of the one that
just ended (DVC skipped them because their outputs were cached) — and the scratch baseline when its outputs match
the current params. A downstream stage may still rerun, so its figures wait for it.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import warnings
from typing import Any

from omegaconf import DictConfig, OmegaConf

from xfer.data.paths import FEATURES, METRICS, REPORTS, RUNS, SPLIT_NAMES, SPLITS

STAGES = ("download", "split", "featurize", "audit", "views", "trunk", "train_head", "finetune", "evaluate", "scratch",
          "export")
# Which stages' outputs each stage reads (their run ids become the stage run's upstream.* tags).
UPSTREAM = {
    "download": [],
    "split": ["download"],
    "featurize": ["split"],
    "audit": ["featurize", "split"],
    "views": ["featurize"],
    "trunk": ["featurize"],
    "train_head": ["featurize", "views"],
    "finetune": ["train_head", "featurize", "trunk"],
    "evaluate": ["finetune", "train_head"],
    "export": ["evaluate"],
    "scratch": ["split"],
}
# Nothing reads the scratch stage's or the audit's outputs, so DVC may run them before or after the others: every
# stage summarizes them once their outputs match the current params and split (reports/scratch.json and
# reports/audit.json record what produced them).
KEY_PARAMS = ("backbone.name", "backbone.weights", "backbone.image_size", "backbone.unfreeze_from", "head.name",
              "head.units", "head.dropout", "head.learning_rate", "head.label_smoothing", "featurize.train_views",
              "finetune.enabled", "finetune.learning_rate", "finetune.epochs", "finetune.trunk_views",
              "split.train", "split.val", "split.test", "seed", "data.name", "evaluate.tta", "runtime.precision",
              "scratch.name", "scratch.image_size", "scratch.epochs")
# Params that do not change what a pipeline computes (left out of config_digest, which groups seeds).
# The scratch baseline is grouped on its own (scratch_config_digest).
NOT_IN_DIGEST = ("seed", "mlflow", "evaluate.register", "evaluate.registered_model", "scratch", "audit")
# What the scratch stage's results depend on (besides the split's manifests).
SCRATCH_INPUTS = ("scratch", "runtime", "evaluate.tta", "evaluate.misclassified", "evaluate.correct_per_class")
# What a null setting means, logged instead of "none".
NULL_MEANS = {"backbone.weights": "random", "backbone.feature_layer": "last layer", "data.sha256": "unchecked",
              "featurize.pooling": "none (flatten)", "finetune.patience": "none (no early stopping)",
              "head.patience": "none (no early stopping)"}
# Numbers copied from a stage's own run (when it is in this tracking store): how each fit ended, the model size.
FIT = ("stopped_epoch", "early_stopped", "best_epoch")
RUN_METRICS = {"train_head": ("head_", FIT), "finetune": ("finetuned_", (*FIT, "mean_epoch_seconds")),
               "evaluate": ("", ("model_params", "head_test_f1_macro")),
               "scratch": ("scratch_", (*FIT, "model_params", "test_accuracy_without_tta"))}
# reports/metrics/<file>.json -> prefix of its numbers in the parent run.
METRIC_FILES = {"download": ("download", "images_"), "featurize": ("featurize", "featurize_"),
                "audit": ("audit", "audit_"), "train_head": ("head", "head_"), "finetune": ("finetune", "finetuned_"),
                "evaluate": ("evaluate", ""), "export": ("export", "export_"),
                "scratch": ("scratch", "")}  # its keys already say scratch_


# The runs table as the UI's "Share" button saves a view: parents with the columns a comparison reads (stage runs
# nested under them). Open it at #/experiments/<id>/runs?viewStateShareKey=leaderboard.
VIEW = "leaderboard"
VIEW_COLUMNS = ("attributes.`Dataset`", "attributes.`Duration`", "params.`backbone.name`",
                "params.`backbone.image_size`", "params.`head.name`", "params.`finetune.enabled`", "params.`seed`",
                "metrics.`test_accuracy`", "metrics.`head_test_accuracy`", "metrics.`test_auc`", "metrics.`test_ece`",
                "params.`scratch.name`", "metrics.`scratch_test_accuracy`")


def experiment_tags() -> dict[str, str]:
    """Tags of a pipeline's MLflow experiment: a model-training experiment, with the leaderboard view."""
    return {"mlflow.experimentKind": "custom_model_development",
            f"mlflow.sharedViewState.{VIEW}": json.dumps({"searchFilter": "", "selectedColumns": list(VIEW_COLUMNS)})}


def view_url(experiment_id: str, server: str | None = None) -> str:
    """The leaderboard view in the MLflow UI: on the tracking server when MLFLOW_TRACKING_URI is one, else where
    `mlflow ui` serves it."""
    if server is None:
        uri = os.environ.get("MLFLOW_TRACKING_URI", "")
        server = uri.rstrip("/") if uri.startswith(("http://", "https://")) else "http://127.0.0.1:5000"
    return f"{server}/#/experiments/{experiment_id}/runs?viewStateShareKey={VIEW}"


def settled(stage: str) -> list[str]:
    """``stage`` and every stage upstream of it, in pipeline order."""
    todo, seen = [stage], set()
    while todo:
        s = todo.pop()
        if s not in seen:
            seen.add(s)
            todo.extend(UPSTREAM[s])
    return [s for s in STAGES if s in seen]


def shown(value: Any, key: str = "") -> Any:
    """A param as MLflow shows it: lists as JSON, None as what it means (``NULL_MEANS``) or "none"."""
    if value is None:
        return NULL_MEANS.get(key, "none")
    if OmegaConf.is_config(value):
        value = OmegaConf.to_container(value, resolve=True)
    return json.dumps(value) if isinstance(value, (list, dict)) else value


def _digest(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:12]


def config_digest(cfg: DictConfig) -> str:
    """Identifies everything but the seed, the scratch baseline (and where runs are logged): transfer-learning
    pipelines with the same digest differ only in their seed."""
    data = OmegaConf.to_container(cfg, resolve=True)
    for key in NOT_IN_DIGEST:
        *path, last = key.split(".")
        node = data
        for part in path:
            node = node.get(part, {})
        node.pop(last, None)
    return _digest(data)


def scratch_config_digest(cfg: DictConfig) -> str:
    """Identifies the scratch baseline's settings and data, all but the seed (groups its seeds)."""
    def plain(key: str) -> Any:
        value = OmegaConf.select(cfg, key)
        return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value

    return _digest({k: plain(k) for k in ("data", "split", *SCRATCH_INPUTS)})


def scratch_digest(cfg: DictConfig) -> str:
    """Identifies exactly what the scratch stage's outputs come from: its params, the seed and the split's
    manifests (which name every image by its sha256)."""
    manifests = [hashlib.sha256((SPLITS / f"{n}.csv").read_bytes()).hexdigest() if (SPLITS / f"{n}.csv").is_file()
                 else None for n in SPLIT_NAMES]
    return _digest({"config": scratch_config_digest(cfg), "seed": cfg.seed, "manifests": manifests})


def audit_digest(cfg: DictConfig) -> str:
    """Identifies what the audit's outputs come from: its params, the seed, the features' settings and the split's
    manifests."""
    def plain(key: str) -> Any:
        value = OmegaConf.select(cfg, key)
        return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value

    manifests = [hashlib.sha256((SPLITS / f"{n}.csv").read_bytes()).hexdigest() if (SPLITS / f"{n}.csv").is_file()
                 else None for n in SPLIT_NAMES]
    return _digest({k: plain(k) for k in ("audit", "seed", "data", "backbone", "featurize")} | {"manifests": manifests})


def key_params(cfg: DictConfig) -> dict[str, Any]:
    return {k: shown(OmegaConf.select(cfg, k), k) for k in KEY_PARAMS}


def split_datasets(cfg: DictConfig, names=SPLIT_NAMES) -> list[tuple[str, Any]]:
    """(context, MLflow dataset entity) of each split manifest present: its rows (path, label, class, sha256) give
    the digest; the source is the data URL."""
    import mlflow.data
    import pandas as pd

    out = []
    for name in names:
        path = SPLITS / f"{name}.csv"
        if path.is_file():
            with warnings.catch_warnings():  # schema inference hints about integer columns
                warnings.simplefilter("ignore")
                ds = mlflow.data.from_pandas(pd.read_csv(path), source=str(cfg.data.get("url") or path),
                                             name=f"{cfg.data.name}-{name}", targets="label")
                out.append((name, ds._to_mlflow_entity()))
    return out


def log_datasets(client, run_id: str, cfg: DictConfig, names=SPLIT_NAMES) -> None:
    """Log the split manifests as the run's input datasets (once each)."""
    from mlflow.entities import DatasetInput, InputTag

    from xfer.core.retry import retry_locked

    have = {d.dataset.name for d in client.get_run(run_id).inputs.dataset_inputs}
    new = [DatasetInput(entity, [InputTag("mlflow.data.context", context)])
           for context, entity in split_datasets(cfg, names) if entity.name not in have]
    if new:
        retry_locked(client.log_inputs, run_id, datasets=new)


def parent_name(cfg: DictConfig, pid: str) -> str:
    """The DVC experiment's name, else the backbone and the pipeline id."""
    return os.environ.get("DVC_EXP_NAME") or f"{cfg.backbone.name}-{pid}"


def open_parent(client, experiment_id: str, pid: str, cfg: DictConfig, tags: dict[str, str]) -> str:
    """The parent run of pipeline ``pid`` (created with its key params by the first stage), set RUNNING."""
    from mlflow.entities import Param

    from xfer.core.retry import retry_locked

    found = client.search_runs([experiment_id], f"tags.role = 'pipeline' and tags.pipeline_id = '{pid}'",
                               max_results=1)
    if found:
        run_id = found[0].info.run_id
        retry_locked(client.update_run, run_id, status="RUNNING")
        return run_id
    run = retry_locked(client.create_run, experiment_id, run_name=parent_name(cfg, pid),
                       tags={**tags, "role": "pipeline", "config_digest": config_digest(cfg)})
    params = [Param(k, str(v)) for k, v in key_params(cfg).items()]
    retry_locked(client.log_batch, run.info.run_id, params=params)
    retry_locked(client.log_text, run.info.run_id, OmegaConf.to_yaml(cfg), "params.yaml")
    return run.info.run_id


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _read(path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def data_sha256() -> str | None:
    """The sha256 of the downloaded archive, as the download stage recorded it (None for generated data)."""
    return _read(REPORTS / "download.json").get("source", {}).get("sha256")


def _stage_metrics(client, run_id: str) -> dict[str, float]:
    from mlflow.exceptions import MlflowException

    try:
        return client.get_run(run_id).data.metrics
    except MlflowException:  # produced elsewhere (e.g. outputs pulled from a DVC remote): links only
        return {}


def refresh(client, parent_id: str, stage: str, pid: str, cfg: DictConfig, status: str) -> None:
    """Summarize the settled stages in the parent (links, metrics, seconds, datasets) and end it with ``status``."""
    from mlflow.entities import Metric, Param, RunTag

    from xfer.core.retry import retry_locked

    known = set(settled(stage))  # once the split is settled, the manifests the scratch digest reads are final
    if "split" in known and _read(REPORTS / "scratch.json").get("inputs_digest") == scratch_digest(cfg):
        known.add("scratch")
    if "featurize" in known and _read(REPORTS / "audit.json").get("inputs_digest") == audit_digest(cfg):
        known.add("audit")
    records = {s: _read(RUNS / f"{s}.json") for s in STAGES}  # a stage that ran in this pipeline is final too
    records = {s: r for s, r in records.items() if r.get("run_id") and (s in known or r.get("pipeline_id") == pid)}
    ran = [s for s, r in records.items() if r.get("pipeline_id") == pid]
    cached = [s for s in records if s not in ran]
    run = client.get_run(parent_id)
    values: dict[str, float] = {}
    for s, r in records.items():
        if _number(r.get("seconds")):
            values[f"{s}_seconds"] = float(r["seconds"])
        file, prefix = METRIC_FILES.get(s, (None, ""))
        if file:
            values.update({prefix + k: float(v) for k, v in _read(METRICS / f"{file}.json").items() if _number(v)})
        if s in RUN_METRICS:
            prefix, keys = RUN_METRICS[s]
            values.update({prefix + k: v for k, v in _stage_metrics(client, r["run_id"]).items() if k in keys})
    now = int(time.time() * 1000)
    new = [Metric(k, v, now, 0) for k, v in values.items() if run.data.metrics.get(k) != v]
    # Totals grow stage by stage: one point per stage (its place in the pipeline), the last one is the total.
    totals = {"pipeline_seconds": round(sum(float(records[s].get("seconds", 0)) for s in ran), 2),
              "from_scratch_seconds": round(sum(float(r.get("seconds", 0)) for r in records.values()), 2),
              "cached_stage_count": len(cached)}
    new += [Metric(k, v, now, STAGES.index(stage)) for k, v in totals.items()]
    params = {"data_sha256": data_sha256(),
              "weights_sha256": _read(FEATURES / cfg.backbone.name / "meta.json").get("weights_sha256")}
    if "featurize" in records and params["weights_sha256"] is None:
        params["weights_sha256"] = "random" if cfg.backbone.weights is None else f"keras {cfg.backbone.weights}"
    new_params = [Param(k, str(v)) for k, v in params.items() if v is not None and k not in run.data.params]
    links = "\n".join(f"- {s}: [{r['run_id'][:8]}](#/experiments/{r.get('experiment_id', '')}/runs/{r['run_id']})"
                      f"{' — cached, from an earlier pipeline' if s in cached else ''}" for s, r in records.items())
    tags = {f"stage.{s}": r["run_id"] for s, r in records.items()}
    if "scratch" in records:
        tags["scratch_config_digest"] = scratch_config_digest(cfg)
    tags.update(ran_stages=",".join(ran), cached_stages=",".join(cached) or "none",
                **{"mlflow.note.content": f"Pipeline `{pid}`: stages and their runs\n\n{links}\n"})
    retry_locked(client.log_batch, parent_id, metrics=new, params=new_params,
                 tags=[RunTag(k, v) for k, v in tags.items()])
    if stage != "download":
        log_datasets(client, parent_id, cfg)
    retry_locked(client.set_terminated, parent_id, status)


def model_card(cfg: DictConfig, run, metrics: dict) -> tuple[str, dict[str, str]]:
    """Description (Markdown) and tags of a registered model version: test metrics, data, parameters, lineage."""
    t = run.data.tags
    data_sha = data_sha256() or "not recorded"
    params = key_params(cfg)
    m = {k: float(metrics[k]) for k in ("test_accuracy", "test_auc", "test_ece", "test_loss", "test_f1_macro")
         if k in metrics}
    b, s = cfg.backbone, cfg.split
    tuned = f"fine-tuned from {b.unfreeze_from}" if cfg.finetune.enabled else "not fine-tuned (feature extraction)"
    description = "\n".join([
        f"**{b.name}** ({params['backbone.weights']} weights, {b.image_size} px), head `{cfg.head.name}`, {tuned}; "
        f"test-time augmentation {shown(list(cfg.evaluate.tta or []))}.",
        "",
        "| " + " | ".join(k.removeprefix("test_") for k in m) + " |",
        "|" + "---|" * len(m),
        "| " + " | ".join(f"{v:.4f}" for v in m.values()) + " |",
        "",
        f"Data: `{cfg.data.name}` from {cfg.data.get('url') or cfg.data.kind} (sha256 {data_sha}); per class "
        f"train/val/test {s.train}/{s.val}/{s.test}, seed {cfg.seed}.",
        f"Evaluate run `{run.info.run_id}`, pipeline `{t.get('pipeline_id')}` (parent run "
        f"`{t.get('mlflow.parentRunId')}`), git `{t.get('git_commit')}`"
        + (f", DVC experiment `{t['dvc_exp_name']}`." if t.get("dvc_exp_name") else "."),
    ])
    tags = {**{k: f"{v:.4f}" for k, v in m.items()}, "backbone": b.name, "image_size": str(b.image_size),
            "weights": str(params["backbone.weights"]), "head": cfg.head.name,
            "finetuned": str(bool(cfg.finetune.enabled)).lower(), "data": cfg.data.name, "data_sha256": data_sha,
            "split": f"{s.train}/{s.val}/{s.test}", "seed": str(cfg.seed), "config_digest": config_digest(cfg),
            "run_id": run.info.run_id, **{k: t.get(k, "") for k in ("pipeline_id", "git_commit", "dvc_exp_name")},
            "parent_run_id": t.get("mlflow.parentRunId", "")}
    return description, tags


def tag_model_version(evaluate_run_id: str | None, export_run_id: str, flat: dict[str, float],
                      formats: dict[str, dict]) -> str:
    """Tag the model version registered by the evaluate run with each exported file (its artifact URI in the
    export run) and its test accuracy, size and latency; say which version (or that none was registered)."""
    import mlflow

    from xfer.core.retry import retry_locked

    client = mlflow.MlflowClient()
    versions = (retry_locked(client.search_model_versions, f"run_id = '{evaluate_run_id}'")
                if evaluate_run_id else [])
    if not versions:
        return "no registered model version to tag (evaluate.register=false?)"
    v = versions[0]
    tags = {"export_run_id": export_run_id}
    for fmt, r in formats.items():
        tags[f"export.{fmt}.uri"] = f"runs:/{export_run_id}/export/{r['file']}"
        tags.update({f"export.{fmt}.{k}": f"{flat[f'{fmt}_{k}']:.4g}" for k in
                     ("test_accuracy", "accuracy_diff_points", "size_mb", "latency_1_ms")})
    for key, value in tags.items():
        retry_locked(client.set_model_version_tag, v.name, v.version, key, value)
    return f"files tagged on models:/{v.name}/{v.version}"

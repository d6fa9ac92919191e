"""``xfer search``: an Optuna study over a search space (conf/search/<space>.yaml) on the current feature cache.

usage: xfer search [SPACE] [--trials N] [--timeout SECONDS] [--storage URL] [--study NAME] [--name NAME]
                   [--worker N] [key=value ...]

Each trial runs train_head's fit on k folds of the training + validation features (and, in a space with finetune.*
keys, the finetune stage's fit of the base's top and the head on the fold's activations at backbone.unfreeze_from;
the test split is never read) and is pruned when its running mean falls below the median of earlier trials at the
same fold. The winner is the best mean CV accuracy; the defaults of params.yaml (the current preset) are scored on
the same folds, and the report gives the winner's gain over them per fold (mean ± std). The winner is written as
conf/experiment/search-<name>.yaml: `dvc exp run -S experiment=search-<name>` trains, evaluates (the test set, once)
and registers it. The study lives in mlruns/optuna.db beside the MLflow database (or --storage, e.g. the team
stack's PostgreSQL): several workers (`--worker 1`, `--worker 2`, ... for distinct sampler seeds) share one study.
Ctrl-C stops the search; the best trial so far is kept and written.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any

import numpy as np

from xfer import XferError
from xfer.core import signals
from xfer.core.args import Parser
from xfer.core.files import write_json
from xfer.core.presets import write_preset
from xfer.core.retry import retry_locked
from xfer.data.paths import CLASSES, REPORTS, load_features, load_training_features
from xfer.nets.search import (
    CACHED_VIEWS_KEY,
    STEPS_PER_EXECUTION,
    Pruned,
    cv_data,
    cv_scores,
    default_storage,
    folds_of,
    load_space,
    preset_values,
    study_name,
    trial_config,
)

SEARCH_REPORTS = REPORTS / "search"


def redacted(url: str) -> str:
    """A database URL without its password (``postgresql://user:***@host/db``)."""
    import re

    return re.sub(r"://([^:/@]+):[^@]*@", r"://\1:***@", url)


def storage_for(url: str | None):
    """An Optuna RDB storage (SQLite waits for its lock instead of failing at once). Workers started together
    race to create the schema: the loser's CREATE TABLE (or version row) fails, and a retry finds it made."""
    import optuna

    from xfer.track.store import tracking_uri

    url = url or os.environ.get("XFER_SEARCH_STORAGE") or default_storage(tracking_uri())
    kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite:") else {"pool_pre_ping": True}
    storage = retry_locked(optuna.storages.RDBStorage, url, engine_kwargs=kwargs, also=("already exists",))
    return storage, url


class Objective:
    """Score a trial's point by k-fold CV on cached features (``arrays``: train features and labels, the views
    stage's rows or None, val features and labels, the number of classes); ``log(number, point, metrics, state)``
    records each trial (:meth:`from_cache` logs them as nested MLflow runs)."""

    def __init__(self, cfg, space, arrays: tuple, log=None):
        x_train, y_train, x_views, self.x_val, self.y_val, n_classes = arrays
        self.cfg, self.space, self.record = cfg, space, log
        self.cached_views = len(x_views) // max(len(x_train), 1) if x_views is not None else 0
        self.raw = (x_train, y_train, x_views, n_classes)
        self.data: dict[str, Any] = {}
        self.bd = None  # the boundary activations of fine-tuning trials (xfer.nets.tuning), made at first need
        self.folds = folds_of(np.concatenate([y_train, self.y_val]).astype(np.int64), space.folds, int(cfg.seed))

    @classmethod
    def from_cache(cls, cfg, space, client=None, parent: str | None = None) -> Objective:
        """On the current cache's arrays; each trial a nested MLflow run under ``parent`` (with a ``client``)."""
        from xfer.core.files import read_json
        from xfer.track.runs import log_trial

        x_all, _, views = load_training_features(cfg.backbone.name)
        x_train, y_train = load_features(cfg.backbone.name, "train")
        x_val, y_val = load_features(cfg.backbone.name, "val")
        arrays = (x_train, y_train, x_all[len(x_train):] if views else None, x_val, y_val, len(read_json(CLASSES)))
        return cls(cfg, space, arrays, None if client is None else lambda *a: log_trial(client, parent, cfg, *a))

    def data_for(self, pooling: str):
        if pooling not in self.data:
            x_train, y_train, views, n_classes = self.raw
            self.data[pooling] = cv_data(x_train, y_train, views, self.x_val, self.y_val, pooling, n_classes)
        return self.data[pooling]

    def boundary(self):
        if self.bd is None:
            from xfer.nets.tuning import boundary_data

            started = time.perf_counter()
            self.bd = boundary_data(self.cfg, self.space.trunk_views(self.cfg))
            print(f"search: activations at {self.cfg.backbone.unfreeze_from} of {len(self.bd.acts)} train+val "
                  f"images and {self.bd.k} trunk views ({self.bd.source}) in {time.perf_counter() - started:.0f} s",
                  flush=True)
        return self.bd

    def score(self, point: dict[str, Any], report=None) -> list[float]:
        c = trial_config(self.cfg, self.space, point)
        views = int(c.featurize.train_views) if CACHED_VIEWS_KEY in point else self.cached_views
        data = self.data_for(str(c.head.pooling))
        then = None
        if self.space.fine_tunes and c.finetune.enabled:
            from xfer.nets.tuning import FineTuning

            then = FineTuning(self.boundary(), c, data.n_classes, data.y, STEPS_PER_EXECUTION)
        return cv_scores(data, c.head, self.folds, int(c.seed), views, report, bool(c.runtime.deterministic), then)

    def __call__(self, trial) -> float:
        import optuna

        point = self.space.suggest(trial)
        reported: list[float] = []

        def report(fold: int, mean: float) -> None:
            reported.append(mean)
            trial.report(mean, fold)
            if trial.should_prune():
                raise Pruned(fold)

        started = time.perf_counter()
        try:
            scores = self.score(point, report)
        except Pruned:
            self.log(trial.number, point, {"cv_accuracy_so_far": reported[-1], "folds_run": len(reported),
                                           "seconds": time.perf_counter() - started}, "PRUNED")
            raise optuna.TrialPruned() from None
        mean, std = float(np.mean(scores)), float(np.std(scores))
        trial.set_user_attr("fold_scores", scores)
        self.log(trial.number, point, {"cv_accuracy": mean, "cv_accuracy_std": std, "seconds":
                                       time.perf_counter() - started, **{f"fold_{i}": s for i, s in enumerate(scores)}},
                 "COMPLETE")
        return mean

    def log(self, number: int, point: dict, metrics: dict, state: str) -> None:
        if self.record is not None:
            self.record(number, point, metrics, state)
        shown = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in point.items())
        what = f"cv_accuracy {metrics['cv_accuracy']:.4f}" if "cv_accuracy" in metrics else \
            f"pruned after {metrics['folds_run']} folds"
        print(f"trial {number}: {what} ({metrics['seconds']:.1f} s) {shown}", flush=True)


def baseline(study, objective: Objective) -> list[float]:
    """The current params' fold scores (computed once per study, shared by its workers)."""
    if "baseline_fold_scores" not in study.user_attrs:
        scores = objective.score({})
        study.set_user_attr("baseline_fold_scores", scores)
    return list(study.user_attrs["baseline_fold_scores"])


def summary(study, base: list[float], space) -> dict[str, Any] | None:
    """The winner against the baseline on the same folds: mean and std of the per-fold gain."""
    import optuna

    states = [t.state for t in study.trials]
    out: dict[str, Any] = {"trials_complete": states.count(optuna.trial.TrialState.COMPLETE),
                           "trials_pruned": states.count(optuna.trial.TrialState.PRUNED),
                           "baseline_cv_accuracy": float(np.mean(base)),
                           "baseline_cv_accuracy_std": float(np.std(base)),
                           "folds": space.folds}
    if not out["trials_complete"]:
        return out
    best = study.best_trial
    gain = np.asarray(best.user_attrs["fold_scores"]) - np.asarray(base)
    out["winner_values"] = preset_values(None, space, best.params)  # the preset's keys had it been adopted
    std = float(gain.std(ddof=1)) if len(gain) > 1 else 0.0
    out.update(best_trial=best.number, best_params=best.params, best_cv_accuracy=float(best.value),
               best_cv_accuracy_std=float(np.std(best.user_attrs["fold_scores"])), gain=float(gain.mean()),
               gain_std=std, gain_stderr=std / np.sqrt(len(gain)))
    # The best of many noisy trials flatters itself (the winner's curse): it replaces the params it started from
    # only when its paired per-fold gain exceeds `significance` standard errors.
    out["adopted"] = bool(out["gain"] > space.significance * out["gain_stderr"] and out["gain"] > 0)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = Parser(prog="xfer search", description=__doc__.splitlines()[0])
    ap.add_argument("space", nargs="?", default="default", help="conf/search/<space>.yaml (default: default)")
    ap.add_argument("overrides", nargs="*", help="key=value overrides of params.yaml for this search")
    ap.add_argument("--trials", type=int, default=None, help="trials for this worker (default: the space's)")
    ap.add_argument("--timeout", type=float, default=None, help="stop starting trials after SECONDS")
    ap.add_argument("--storage", default=None, help="Optuna RDB URL (default: mlruns/optuna.db beside mlflow.db)")
    ap.add_argument("--study", default=None, help="study name (default: <data>-<backbone>-<space>-<cache hash>)")
    ap.add_argument("--name", default=None, help="preset name: conf/experiment/search-<name>.yaml (default: study)")
    ap.add_argument("--worker", type=int, default=0, help="this worker's number (sampler seed = seed + N)")
    args = ap.parse_args(argv)
    if "=" in args.space:
        args.overrides, args.space = [args.space, *args.overrides], "default"
    try:
        return run(args)
    except XferError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def run(args) -> int:
    from xfer.core.config import load_params
    from xfer.core.quiet import import_tensorflow

    cfg = load_params(args.overrides)
    cached = load_training_features(cfg.backbone.name)[2]
    space = load_space(args.space, cfg, cached)
    import_tensorflow()
    import optuna

    from xfer.track.figures import log_study_figures
    from xfer.track.runs import study_run

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage, url = storage_for(args.storage)
    name = args.study or study_name(cfg, space)
    sampler = optuna.samplers.TPESampler(seed=int(cfg.seed) + args.worker, n_startup_trials=space.startup_trials)
    pruner = optuna.pruners.MedianPruner(n_startup_trials=space.startup_trials, n_warmup_steps=0)
    study = optuna.create_study(study_name=name, storage=storage, sampler=sampler, pruner=pruner,
                                direction="maximize", load_if_exists=True)
    client, parent = study_run(cfg, study)
    objective = Objective.from_cache(cfg, space, client, parent)
    n_trials = args.trials if args.trials is not None or args.timeout is not None else space.trials
    images = sum(len(part) for part in objective.folds[0])
    print(f"search: study {name} ({redacted(url)}), {space.folds}-fold CV on {images} train+val images"
          f", budget {n_trials or 'unlimited'} trials, {args.timeout or 'no'} timeout", flush=True)
    started = time.perf_counter()
    interrupted, code = False, 0
    signals.install()  # Ctrl-C and SIGTERM are remembered even where a library swallows the KeyboardInterrupt
    try:
        if space.fine_tunes:
            objective.boundary()  # once per search, before the trials: their seconds are their own
        base = baseline(study, objective)
        print(f"baseline (params.yaml): cv_accuracy {np.mean(base):.4f} ± {np.std(base):.4f}", flush=True)
        study.optimize(objective, n_trials=n_trials, timeout=args.timeout, gc_after_trial=True,
                       callbacks=[stop_if_interrupted])
    except KeyboardInterrupt as exc:
        interrupted, code = True, 143 if isinstance(exc, signals.Terminated) or signals.terminated() else 130
        signals.handled()  # the best trial so far is still written
        print("interrupted; keeping the best trial so far", file=sys.stderr)
        base = list(study.user_attrs.get("baseline_fold_scores", []))
    seconds = time.perf_counter() - started
    if not base:
        print("search: stopped before the baseline was scored; nothing to report", file=sys.stderr)
        return code or 130
    result = summary(study, base, space) or {}
    result.update(study=name, storage=redacted(url), worker=args.worker, worker_seconds=round(seconds, 2),
                  interrupted=interrupted)
    if "best_params" in result:
        preset = args.name or name
        values = preset_values(cfg, space, result["best_params"]) if result["adopted"] else {}
        verdict = ("adopted" if result["adopted"] else
                   f"not adopted: the gain is within {space.significance:g} standard errors, so this preset keeps "
                   "the params the search started from")
        header = (f"Written by `xfer search {space.name}` (study {name}): best trial {result['best_trial']}, "
                  f"CV accuracy {result['best_cv_accuracy']:.4f} ({space.folds} folds of train+val)\n"
                  f"vs {result['baseline_cv_accuracy']:.4f} for the params it started from: gain "
                  f"{result['gain']:+.4f} ± {result['gain_std']:.4f} (std over folds), {verdict}.\n"
                  f"Best trial: {result['best_params']}\n"
                  f"Reproduce through the pipeline: dvc exp run -S experiment=search-{preset}")
        path = write_preset(f"search-{preset}", cfg, values, header)
        result.update(preset=str(path.relative_to(path.parents[2])), preset_values=values)
        retry_locked(client.log_artifact, parent, str(path))
    metrics = {k: float(result[k]) for k in ("best_cv_accuracy", "best_cv_accuracy_std", "baseline_cv_accuracy",
                                             "gain", "gain_std", "adopted", "trials_complete", "trials_pruned")
               if k in result}
    for key, value in {**metrics, "worker_seconds": seconds}.items():
        retry_locked(client.log_metric, parent, key, float(value))
    result["figures"] = log_study_figures(client, parent, study)
    retry_locked(client.set_tag, parent, "interrupted", str(interrupted).lower())  # the best so far is kept anyway
    retry_locked(client.set_terminated, parent, "FINISHED")
    write_json(SEARCH_REPORTS / f"{name}.json", result)
    if "best_params" in result:
        kept = "the winner" if result["adopted"] else "params.yaml's settings (gain within the noise)"
        print(f"search: best cv_accuracy {result['best_cv_accuracy']:.4f} (trial {result['best_trial']}), "
              f"{result['gain']:+.4f} ± {result['gain_std']:.4f} over params.yaml's; {result['trials_complete']} "
              f"complete, {result['trials_pruned']} pruned, {seconds:.0f} s -> {result['preset']} ({kept}); "
              f"reproduce: dvc exp run -S experiment=search-{preset}")
    else:
        print("search: no complete trial yet; nothing written")
    return code


def stop_if_interrupted(study, trial) -> None:
    """Optuna callback after each trial: end the search on a Ctrl-C (or SIGTERM) that arrived where it was swallowed
    (inside TensorFlow, or in a destructor that gc_after_trial ran), instead of running the rest of the budget."""
    signals.raise_if_interrupted()


if __name__ == "__main__":
    raise SystemExit(main())

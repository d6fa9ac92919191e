"""MLflow tracking shared by the stages: one run per stage, nested in the parent run of its pipeline execution."""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from xfer.core.config import project_root, repo_root
from xfer.core.files import read_json, write_json
from xfer.core.retry import retry_locked
from xfer.core.signals import interrupted
from xfer.data.paths import RUNS
from xfer.track import spool
from xfer.track.recorder import Recorder, activate, active, wait_seconds
from xfer.track.store import prepare_database, tracking_uri
from xfer.track.summary import UPSTREAM, experiment_tags, open_parent, shown, split_datasets

BACKBONE_FREE = ("download", "split", "scratch")  # stages whose runs are not named or tagged after a backbone


def _process_alive(pid: int, started: float) -> bool:
    import psutil

    try:
        return abs(psutil.Process(pid).create_time() - started) < 1.0
    except (psutil.Error, ValueError):
        return False


def close_abandoned_runs(experiment_id: str) -> list[str]:
    """Mark KILLED the RUNNING runs of this experiment whose stage process (on this host) no longer exists,
    e.g. after a SIGKILL or a power cut; return their ids."""
    import mlflow

    client = mlflow.MlflowClient()
    host, closed, waiting = socket.gethostname(), [], spool.spooled_runs()  # ended, their records in the spool
    for run in client.search_runs([experiment_id], "attributes.status = 'RUNNING'", max_results=1000):
        tags = run.data.tags
        if run.info.run_id in waiting:
            continue
        if tags.get("xfer.host") != host or "xfer.pid" not in tags:
            continue
        if not _process_alive(int(tags["xfer.pid"]), float(tags.get("xfer.pid_started", 0))):
            retry_locked(client.set_tag, run.info.run_id, "xfer.closed_because",
                         "its process ended without closing the run")
            retry_locked(client.set_terminated, run.info.run_id, "KILLED")
            closed.append(run.info.run_id)
    return closed


def pipeline_process():
    """The DVC process running this stage (``dvc repro``, ``dvc exp run``, a queue worker), or None."""
    import psutil

    from xfer.core.warm import CLIENT_ENV, served

    try:  # a warm child: the command DVC started, which waits for it, is where the chain to DVC starts
        proc = psutil.Process(int(os.environ[CLIENT_ENV])) if served() else psutil.Process().parent()
    except psutil.Error:
        return None
    while proc is not None:
        try:
            cmd = " ".join(proc.cmdline()[:3])
        except psutil.Error:
            return None
        if "dvc" in Path(cmd.split(" ")[0]).name or " -m dvc" in cmd or "/dvc " in f"{cmd} ":
            return proc
        proc = proc.parent()
    return None


def pipeline_id() -> str:
    """Shared by the stages of one ``dvc repro``/``dvc exp run``: 8 hex digits derived from the DVC process
    running them (host, pid, start time).

    ``XFER_PIPELINE_ID`` overrides it; a stage run by hand outside DVC gets a fresh ``manual-`` id.
    """
    if os.environ.get("XFER_PIPELINE_ID"):
        return os.environ["XFER_PIPELINE_ID"]
    proc = pipeline_process()
    if proc is None:
        return f"manual-{uuid.uuid4().hex[:6]}"
    key = f"{socket.gethostname()}:{proc.pid}:{proc.create_time()}"
    return hashlib.sha256(key.encode()).hexdigest()[:8]


def experiment_name(cfg: DictConfig) -> str:
    """The MLflow experiment of a pipeline: ``mlflow.experiment``, or the data set's name when that is null."""
    return cfg.mlflow.experiment or cfg.data.name


def set_experiment(name: str, artifacts: str | None) -> str:
    """Select (creating if needed) the experiment and return its id. With our own database, artifacts go to
    ``artifacts`` (<repo root>/mlruns/artifacts), not to a path relative to the (possibly temporary) working
    directory. Selected by id: ``mlflow.set_experiment(name)`` that loses a creation race to a parallel stage
    returns the experiment without selecting it, and that stage's run would land in the Default experiment."""
    import mlflow

    client = mlflow.MlflowClient()
    experiment = retry_locked(client.get_experiment_by_name, name)
    if experiment is None:
        try:
            retry_locked(client.create_experiment, name, artifact_location=artifacts)
        except mlflow.exceptions.MlflowException:
            if retry_locked(client.get_experiment_by_name, name) is None:
                raise
        experiment = retry_locked(client.get_experiment_by_name, name)  # ours, or a parallel stage's
    experiment = retry_locked(mlflow.set_experiment, experiment_id=experiment.experiment_id)
    missing = {k: v for k, v in experiment_tags().items() if k not in experiment.tags}
    for key, value in missing.items():
        retry_locked(client.set_experiment_tag, experiment.experiment_id, key, value)
    return experiment.experiment_id


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10,
                             cwd=project_root())
        return out.stdout.strip() if out.returncode == 0 else "none"
    except (OSError, subprocess.SubprocessError):
        return "none"


def flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    """``{"head": {"units": 256}}`` -> ``{"head.units": 256}``."""
    if isinstance(d, DictConfig):
        d = OmegaConf.to_container(d, resolve=True)
    if not isinstance(d, dict):
        return {prefix: d}
    out: dict[str, Any] = {}
    for key, value in d.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        out.update(flatten(value, name) if isinstance(value, dict) else {name: value})
    return out


def upstream_runs(stage: str) -> dict[str, str]:
    """Run ids of the upstream stages that produced this stage's inputs."""
    links = {}
    for up in UPSTREAM[stage]:
        path = RUNS / f"{up}.json"
        if path.is_file():
            links[up] = read_json(path)["run_id"]
    return links


def _owner_tags(proc) -> dict[str, str]:
    """Who keeps a run RUNNING (see :func:`close_abandoned_runs`)."""
    return {"xfer.host": socket.gethostname(), "xfer.pid": str(proc.pid),
            "xfer.pid_started": str(proc.create_time())}


def _drop_active_run() -> None:
    """Forget the fluent API's active run without a call to the server: the recorder sends the run's end."""
    from mlflow.tracking import fluent

    stack = fluent._active_run_stack.get()
    if stack:
        stack.pop()
    os.environ.pop("MLFLOW_RUN_ID", None)


def replay_spool(client, uri: str) -> None:
    """Send the records earlier stages could not (xfer.track.spool), one line each; a stage never fails for it."""
    try:
        spool.replay(client, uri, say=lambda line: print(line, file=sys.stderr))
    except Exception as exc:  # the store went away again: the spool stays for the next stage or `xfer sync`
        print(f"tracking: the spool was not replayed ({type(exc).__name__}); it stays in mlruns/spool/",
              file=sys.stderr)


def _finish(rec: Recorder, wait_s: float, tail: list[dict[str, Any]]) -> bool:
    """Close the recorder; when its records went to the spool, say so in one line. True if spooled."""
    where = rec.close(wait_s, tail)
    if where is None:
        return False
    print(f"tracking: {rec.uri} did not take the {rec.stage} run's records within {wait_s:g} s "
          f"(XFER_TRACKING_WAIT); kept in {where.relative_to(repo_root())}/, replayed by the next stage that "
          "reaches it or now by `xfer sync`", file=sys.stderr)
    return True


@contextmanager
def stage_run(stage: str, cfg: DictConfig, sections: list[str], effective: dict[str, Any] | None = None
              ) -> Iterator[Any]:
    """Start the MLflow run of one stage, nested in its pipeline's parent run; log its params (``effective``
    replaces the logged value of a key, e.g. the name a null setting resolved to) and record its run id and wall
    time in reports/runs/<stage>.json; then refresh the parent's summary (xfer.track.summary.refresh).

    The tracking server must answer when the stage starts (the run and its id come from it; the spool of an
    earlier stage is replayed first). From then on the stage's records go through a :class:`Recorder` and never
    make it wait: if the server is gone when the stage ends, they are spooled and the stage still succeeds."""
    import mlflow
    import psutil

    from xfer.core.runtime import quiet_mlflow
    from xfer.core.warm import served

    quiet_mlflow()
    own_db = not os.environ.get("MLFLOW_TRACKING_URI")  # read first: set_tracking_uri() sets the variable
    uri = tracking_uri()
    prepare_database(uri)
    mlflow.set_tracking_uri(uri)
    client = mlflow.MlflowClient()
    replay_spool(client, uri)
    artifacts = (repo_root() / "mlruns" / "artifacts").as_uri() if own_db else None
    experiment_id = set_experiment(experiment_name(cfg), artifacts)
    close_abandoned_runs(experiment_id)
    pid = pipeline_id()
    common = {"dataset": cfg.data.name, "pipeline_id": pid, "git_commit": git_commit(),
              "dvc_exp_name": os.environ.get("DVC_EXP_NAME", "")}
    if stage not in BACKBONE_FREE:
        common["backbone"] = cfg.backbone.name
    owner = pipeline_process() or psutil.Process()
    parent = open_parent(client, experiment_id, pid, cfg, {**common, "backbone": cfg.backbone.name,
                                                            **_owner_tags(owner)})
    tags = {**common, "role": "stage", "stage": stage, "mlflow.parentRunId": parent, **_owner_tags(psutil.Process()),
            "xfer.start": "warm" if served() else "cold"}  # a child of a warm process (xfer.core.warm) or not
    tags.update({f"upstream.{up}": run_id for up, run_id in upstream_runs(stage).items()})
    name = (f"scratch-{cfg.scratch.name}" if stage == "scratch" else stage if stage in BACKBONE_FREE
            else f"{stage}-{cfg.backbone.name}")
    started = time.perf_counter()
    try:
        run = retry_locked(mlflow.start_run, experiment_id=experiment_id, run_name=name, tags=tags)
    except BaseException as exc:
        retry_locked(client.set_terminated, parent, "KILLED" if interrupted(exc) else "FAILED")
        raise
    rec = Recorder(client, run.info.run_id, parent, stage, uri)
    activate(rec)
    try:
        params = {}
        for section in sections:
            params.update(flatten(OmegaConf.select(cfg, section), section))
        params.update(effective or {})
        rec.log_params({k: shown(v, k) for k, v in params.items()})
        try:
            yield run
        except BaseException as exc:  # Ctrl-C or SIGTERM (see config.run_cli): KILLED, not FAILED
            status = "KILLED" if interrupted(exc) else "FAILED"
            rec.end(status)
            rec.end(status, parent)
            try:
                _finish(rec, min(wait_seconds(), 2.0) if interrupted(exc) else wait_seconds(), [])
            except Exception:  # a refused record must not hide why the stage failed
                pass
            raise
        write_json(RUNS / f"{stage}.json", {
            "stage": stage, "run_id": run.info.run_id, "experiment_id": run.info.experiment_id,
            "pipeline_id": pid, "parent_run_id": parent, "tracking_uri": uri,
            "seconds": round(time.perf_counter() - started, 2),
        })
        rec.end("FINISHED")
        rec.put({"op": "refresh", "run_id": parent, "stage": stage, "pipeline_id": pid,  # the parent's summary
                 "cfg": OmegaConf.to_container(cfg, resolve=True), "project": str(project_root()),
                 "stage_run_id": run.info.run_id})
        try:
            _finish(rec, wait_seconds(), [])
        except Exception:  # the store refused a record (a 4xx): the stage fails, as any error would
            for run_id in (run.info.run_id, parent):
                retry_locked(client.set_terminated, run_id, "FAILED")
            raise
    finally:
        activate(None)
        _drop_active_run()


def log_inputs(cfg: DictConfig, *splits: str) -> None:
    """Record the manifests of these splits as the stage run's input datasets (MLflow's Dataset column)."""
    active().log_inputs([(context, entity) for context, entity in split_datasets(cfg, splits)])


def fit_metrics(history, epochs: int) -> dict[str, float]:
    """What a fit reached: the lowest val_loss and the accuracy at that epoch (the weights kept), the best
    val_accuracy, and where training ended (early stopping before ``epochs``)."""
    import numpy as np

    h = history.history
    loss = np.asarray(h.get("val_loss", []), dtype=float)
    acc = np.asarray(h.get("val_accuracy", []), dtype=float)
    run = len(h.get("loss", []))
    out = {"stopped_epoch": run, "early_stopped": int(run < epochs)}
    if len(loss) and np.isfinite(loss).any():
        best = int(np.nanargmin(loss))
        out.update(best_val_loss=float(loss[best]), best_epoch=best + 1)
        if len(acc):
            out.update(val_accuracy_at_best_loss=float(acc[best]), best_val_accuracy=float(np.nanmax(acc)))
    return out


def epoch_logger():
    """A Keras callback logging each epoch's logs (loss, accuracy, val_*, lr) and its wall time, validation
    included (``epoch_seconds``; also kept in its ``seconds`` list), to the active MLflow run. Put it after the
    callbacks that validate."""
    import keras

    rec = active()

    class EpochLogger(keras.callbacks.Callback):
        seconds: list[float] = []

        def on_train_begin(self, logs: dict | None = None) -> None:
            self.seconds = []

        def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
            self.started = time.perf_counter()

        def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
            self.seconds.append(time.perf_counter() - self.started)
            metrics = {k: float(v) for k, v in (logs or {}).items()}
            rec.log_metrics({**metrics, "epoch_seconds": self.seconds[-1]}, step=epoch)  # queued: never waits

    return EpochLogger()


def study_run(cfg: DictConfig, study) -> tuple[Any, str]:
    """The MLflow client and the parent run of an ``xfer search`` study: one per study, whichever worker comes
    first. Each worker creates one, then keeps the earliest of the study's parents (the same for every worker,
    since a worker sees its own and every earlier one) and deletes its own if that is not it."""
    import mlflow

    from xfer.core.runtime import quiet_mlflow

    quiet_mlflow()
    own_db = not os.environ.get("MLFLOW_TRACKING_URI")
    uri = tracking_uri()
    prepare_database(uri)
    mlflow.set_tracking_uri(uri)
    client = mlflow.MlflowClient()
    artifacts = (repo_root() / "mlruns" / "artifacts").as_uri() if own_db else None
    experiment_id = set_experiment(experiment_name(cfg), artifacts)
    query = f"tags.role = 'search' and tags.`xfer.study` = '{study.study_name}'"
    found = retry_locked(client.search_runs, [experiment_id], query, order_by=["attributes.start_time ASC"])
    if found:
        return client, found[0].info.run_id
    tags = {"role": "search", "xfer.study": study.study_name, "dataset": cfg.data.name,
            "backbone": cfg.backbone.name, "git_commit": git_commit()}
    own = retry_locked(client.create_run, experiment_id, run_name=f"search-{study.study_name}", tags=tags).info
    found = retry_locked(client.search_runs, [experiment_id], query, order_by=["attributes.start_time ASC"])
    first = min(found, key=lambda r: (r.info.start_time, r.info.run_id)).info.run_id
    if first != own.run_id:  # another worker's came first
        retry_locked(client.delete_run, own.run_id)
    return client, first


def log_trial(client, parent: str, cfg: DictConfig, number: int, params: dict[str, Any], metrics: dict[str, float],
              state: str) -> str:
    """One trial of a study as a run nested under the study's parent: its params, selection metrics and state
    (COMPLETE, PRUNED, FAIL; also the run's tag ``state``)."""
    parent_run = retry_locked(client.get_run, parent)
    tags = {"mlflow.parentRunId": parent, "role": "trial", "state": state, "trial": str(number),
            "xfer.study": parent_run.data.tags.get("xfer.study", ""), "dataset": cfg.data.name,
            "backbone": cfg.backbone.name}
    run = retry_locked(client.create_run, parent_run.info.experiment_id, run_name=f"trial-{number}", tags=tags)
    rid = run.info.run_id
    for key, value in params.items():
        retry_locked(client.log_param, rid, key, shown(value, key))
    for key, value in metrics.items():
        retry_locked(client.log_metric, rid, key, float(value))
    retry_locked(client.set_terminated, rid, "FINISHED" if state in ("COMPLETE", "PRUNED") else "FAILED")
    return rid

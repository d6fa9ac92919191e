"""Logging that never makes training wait for the tracking store: a stage's records (per-epoch metrics, params,
tags, artifacts) go into a queue that a background thread sends to MLflow, retrying while the server does not
answer. When the stage ends, :meth:`Recorder.close` waits a bounded time (``XFER_TRACKING_WAIT``, seconds) for
the queue to drain; what is still unsent is written to the spool (xfer.track.spool) and replayed later.

The stage calls the module functions (``log_metrics``, ``log_param``, ``log_artifact``, ...), which record into
the run :func:`xfer.track.runs.stage_run` opened.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any

from xfer import XferError
from xfer.core.config import repo_root
from xfer.track import spool

WAIT_S = 30.0  # default of XFER_TRACKING_WAIT: how long a stage's end waits for the server to take its records


def wait_seconds() -> float:
    raw = os.environ.get("XFER_TRACKING_WAIT", str(WAIT_S))
    try:
        value = float(raw)
    except ValueError:
        raise XferError(f"XFER_TRACKING_WAIT={raw!r} is not a number of seconds") from None
    return max(0.0, value)


def _now_ms() -> int:
    return int(time.time() * 1000)


class Recorder:
    """The records of one stage run (and of its parent run), sent in order by a background thread."""

    def __init__(self, client, run_id: str, parent_id: str, stage: str, uri: str) -> None:
        self.client, self.run_id, self.parent_id, self.stage, self.uri = client, run_id, parent_id, stage, uri
        self.sent = 0
        self._ops: deque[dict[str, Any]] = deque()
        self._cv = threading.Condition()
        self._stop = False
        self._error: BaseException | None = None
        root = repo_root() / "mlruns"
        root.mkdir(parents=True, exist_ok=True)
        self.staging = Path(tempfile.mkdtemp(prefix=".records-", dir=root))  # artifacts as they were when logged
        self._thread = threading.Thread(target=self._work, name=f"xfer-tracking-{stage}", daemon=True)
        self._thread.start()

    # -- what a stage records -------------------------------------------------------------------------------------
    def put(self, op: dict[str, Any]) -> None:
        if self._error is not None:
            raise self._error
        with self._cv:
            self._ops.append(op)
            self._cv.notify_all()

    def log_metrics(self, metrics: dict[str, float], step: int = 0, run_id: str | None = None) -> None:
        now = _now_ms()
        self.put({"op": "metrics", "run_id": run_id or self.run_id,
                  "metrics": [[k, float(v), now, int(step)] for k, v in metrics.items()]})

    def log_params(self, params: dict[str, Any]) -> None:
        self.put({"op": "params", "run_id": self.run_id, "params": {k: str(v) for k, v in params.items()}})

    def set_tags(self, tags: dict[str, Any], run_id: str | None = None) -> None:
        self.put({"op": "tags", "run_id": run_id or self.run_id, "tags": {k: str(v) for k, v in tags.items()}})

    def log_artifact(self, path: str | Path, artifact_path: str | None = None, run_id: str | None = None) -> None:
        src = Path(path)
        kept = self.staging / f"{len(os.listdir(self.staging))}" / src.name
        spool.keep_file(src, kept)
        self.put({"op": "artifact", "run_id": run_id or self.run_id, "path": str(kept),
                  "artifact_path": artifact_path})

    def log_bytes(self, data: bytes, name: str, run_id: str | None = None) -> None:
        """An artifact made in memory (a dict, a figure), at ``name`` (``dir/file``) in the run's artifacts."""
        path = self.staging / f"{len(os.listdir(self.staging))}" / Path(name).name
        path.parent.mkdir(parents=True)
        path.write_bytes(data)
        self.put({"op": "artifact", "run_id": run_id or self.run_id, "path": str(path),
                  "artifact_path": str(Path(name).parent) if Path(name).parent != Path(".") else None})

    def log_inputs(self, datasets: list[tuple[str, Any]], run_id: str | None = None) -> None:
        """Input datasets, as (context, mlflow.entities.Dataset)."""
        self.put({"op": "inputs", "run_id": run_id or self.run_id, "datasets": [
            {"context": c, "name": d.name, "digest": d.digest, "source_type": d.source_type, "source": d.source,
             "schema": d.schema, "profile": d.profile} for c, d in datasets]})

    def end(self, status: str, run_id: str | None = None) -> None:
        self.put({"op": "end", "run_id": run_id or self.run_id, "status": status, "end_time": _now_ms()})

    # -- sending ----------------------------------------------------------------------------------------------------
    def _work(self) -> None:
        failures = 0
        while True:
            with self._cv:
                while not self._ops and not self._stop:
                    self._cv.wait()
                if self._stop:
                    return
                op = self._ops[0]
            try:  # after a failure the record may have reached the store in part: send only what it lacks
                spool.send(self.client, op, spool.History(self.client) if failures else None)
            except Exception as exc:
                if not spool.is_transient(exc):
                    self._error = exc
                    with self._cv:
                        self._stop = True
                        self._cv.notify_all()
                    return
                failures += 1
                with self._cv:
                    self._cv.wait_for(lambda: self._stop, timeout=min(2.0**failures, 15.0))
                continue
            failures = 0
            with self._cv:
                if self._ops and self._ops[0] is op:
                    self._ops.popleft()
                    self.sent += 1
                self._cv.notify_all()

    def close(self, wait_s: float, tail: list[dict[str, Any]] = ()) -> Path | None:
        """Wait up to ``wait_s`` for every record to be sent. Then stop sending; write what is left (and
        ``tail``) to the spool and return its folder, or None when all went through. Raises the error of a
        record the store refused (a 4xx: waiting would not help)."""
        deadline = time.monotonic() + wait_s
        with self._cv:
            while self._ops and self._error is None and self._thread.is_alive():
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cv.wait(timeout=left)
            self._stop = True
            unsent = list(self._ops)  # the one being sent, too: a replay skips what reached the store
            self._ops.clear()
            self._cv.notify_all()
        try:
            if self._error is not None:
                raise self._error
            if not unsent:
                return None
            return spool.write({"tracking_uri": self.uri, "stage": self.stage, "run_id": self.run_id,
                                "parent_run_id": self.parent_id}, [*unsent, *tail])
        finally:
            shutil.rmtree(self.staging, ignore_errors=True)


_active: list[Recorder] = []


def activate(recorder: Recorder | None) -> None:
    _active.clear()
    if recorder is not None:
        _active.append(recorder)


def active() -> Recorder:
    """The recorder of the stage run in progress."""
    if not _active:
        raise RuntimeError("no stage run in progress: record inside xfer.track.runs.stage_run")
    return _active[0]


def log_metrics(metrics: dict[str, float], step: int = 0) -> None:
    active().log_metrics(metrics, step)


def log_metric(key: str, value: float, step: int = 0) -> None:
    active().log_metrics({key: value}, step)


def log_params(params: dict[str, Any]) -> None:
    active().log_params(params)


def log_param(key: str, value: Any) -> None:
    active().log_params({key: value})


def set_tag(key: str, value: Any) -> None:
    active().set_tags({key: value})


def log_artifact(path: str | Path, artifact_path: str | None = None) -> None:
    active().log_artifact(path, artifact_path)


def log_dict(data: dict, name: str) -> None:
    """``data`` as JSON (or YAML for a .yaml/.yml name) at ``name`` in the run's artifacts."""
    if name.endswith((".yaml", ".yml")):
        import yaml

        text = yaml.safe_dump(data, default_flow_style=False)
    else:
        text = json.dumps(data, indent=2)
    active().log_bytes(text.encode(), name)

"""The tracking spool: what a stage's MLflow run could not send before the stage ended (its tracking server did not
answer), kept under the repository (``mlruns/spool/``: git-ignored, never a DVC output) and replayed into the same
runs once the server answers again — by the next stage that reaches it, or by ``xfer sync``.

One folder per stage run, written atomically (``.writing-*`` then renamed): ``spool.json`` lists the records in
the order the stage made them (``OPS``: metrics with their steps and timestamps, params, tags, input datasets,
artifacts, the run's end status, the parent's summary refresh) and ``files/`` holds the artifacts' bytes as they
were when logged. A spool is checked whole before anything of it is
sent: a corrupt or partial one is reported in one line and left in place. Sending skips what the server already
holds (a metric point with the same key, step, timestamp and value; a param; a dataset), so a replay cut short
by the server is finished by the next one, and nothing is sent twice; the folder is deleted only when all of it
went through.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from xfer.core.config import repo_root
from xfer.core.retry import retry_locked

FORMAT = 1
# Each record kind and the fields it needs (besides "op" and "run_id").
OPS: dict[str, tuple[str, ...]] = {
    "metrics": ("metrics",),  # [[key, value, timestamp_ms, step], ...]
    "params": ("params",),  # {key: value as shown}
    "tags": ("tags",),
    "inputs": ("datasets",),  # [{context, name, digest, source_type, source, schema, profile}]
    "artifact": ("path", "artifact_path"),  # in a spool also: file (under files/), size, sha256
    "end": ("status", "end_time"),
    "refresh": ("stage", "pipeline_id", "cfg", "project", "stage_run_id"),  # the parent's summary (summary.refresh)
}
HEADER = ("format", "tracking_uri", "stage", "run_id", "parent_run_id", "ops")


class SpoolError(Exception):
    """A spool that cannot be replayed as it is (one line: what is wrong)."""


def folder() -> Path:
    return repo_root() / "mlruns" / "spool"


def _rel(path: Path) -> str:
    try:
        return str(path.relative_to(repo_root()))
    except ValueError:
        return str(path)


@contextmanager
def locked() -> Iterator[Path]:
    """The spool folder, held by this process alone (a replay and a write never interleave)."""
    root = folder()
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield root
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def keep_file(src: Path, dest: Path, link: bool = False) -> None:
    """``dest`` holds ``src``'s bytes as they are now: a copy (in-kernel), or with ``link`` a hard link where the
    file system allows (only for a file nothing rewrites in place, e.g. a recorder's own copy)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    if link:
        try:
            os.link(src, dest)
            return
        except OSError:
            pass
    shutil.copyfile(src, dest)


def write(header: dict[str, Any], ops: list[dict[str, Any]]) -> Path:
    """Write a spool of ``ops`` (artifacts copied in) and return its folder."""
    with locked() as root:
        name = f"{header['stage']}-{header['run_id']}"
        final, n = root / name, 1
        while final.exists():
            n += 1
            final = root / f"{name}.{n}"
        tmp = root / f".writing-{final.name}"
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / "files").mkdir(parents=True)
        kept = []
        for i, op in enumerate(ops):
            op = dict(op)
            if op["op"] == "artifact":
                src = Path(op["path"])
                rel = f"files/{i}/{src.name}"
                keep_file(src, tmp / rel, link=True)  # the recorder's copy, or ours
                op.update(file=rel, size=(tmp / rel).stat().st_size, sha256=sha256(tmp / rel))
            kept.append(op)
        with open(tmp / "spool.json", "w") as f:
            json.dump({"format": FORMAT, **header, "ops": kept}, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        tmp.rename(final)
    return final


def load(path: Path) -> dict[str, Any]:
    """The spool in ``path``, checked whole (every record well formed, every artifact present with its recorded
    size and sha256), or :class:`SpoolError`."""
    if path.name.startswith(".writing-"):
        raise SpoolError("incomplete: the stage that wrote it was stopped while writing")
    try:
        data = json.loads((path / "spool.json").read_text())
    except FileNotFoundError:
        raise SpoolError("incomplete: spool.json is missing") from None
    except (OSError, ValueError) as exc:
        raise SpoolError(f"corrupt spool.json ({type(exc).__name__}: {str(exc)[:80]})") from None
    if not isinstance(data, dict) or any(k not in data for k in HEADER):
        raise SpoolError(f"corrupt spool.json: needs the fields {', '.join(HEADER)}")
    if data["format"] != FORMAT:
        raise SpoolError(f"written in spool format {data['format']!r}, this xfer reads format {FORMAT}")
    if not isinstance(data["ops"], list):
        raise SpoolError("corrupt spool.json: ops is not a list")
    for i, op in enumerate(data["ops"]):
        kind = op.get("op") if isinstance(op, dict) else None
        if kind not in OPS or not isinstance(op.get("run_id"), str) or any(k not in op for k in OPS[kind]):
            raise SpoolError(f"corrupt spool.json: record {i} is not a well-formed record")
        if kind == "metrics" and not all(isinstance(m, list) and len(m) == 4 for m in op["metrics"]):
            raise SpoolError(f"corrupt spool.json: record {i} has malformed metric points")
        if kind == "artifact":
            file = path / str(op.get("file", ""))
            if not op.get("file") or not file.is_file():
                raise SpoolError(f"incomplete: artifact {op.get('file') or op['path']} is missing")
            if file.stat().st_size != op.get("size") or sha256(file) != op.get("sha256"):
                raise SpoolError(f"corrupt: artifact {op['file']} differs from what was recorded")
    return data


def is_transient(exc: BaseException) -> bool:
    """An error that sending again later may resolve: no answer, a timeout, an HTTP 5xx, a locked database
    (a 4xx answer — a bad value, a deleted run — will not change by waiting)."""
    from mlflow.exceptions import MlflowException

    if isinstance(exc, MlflowException):
        return exc.get_http_status_code() >= 500
    return isinstance(exc, (OSError, ConnectionError, TimeoutError)) or "requests" in type(exc).__module__


class History:
    """What the server already holds of a run (metric points, params, datasets): lets a record be sent again
    without duplicates. Filled lazily, per run and key, and kept up to date with what we send."""

    def __init__(self, client) -> None:
        self.client, self.points, self.runs = client, {}, {}

    def run(self, run_id: str):
        if run_id not in self.runs:
            self.runs[run_id] = self.client.get_run(run_id)
        return self.runs[run_id]

    def has_point(self, run_id: str, key: str, point: tuple) -> bool:
        if (run_id, key) not in self.points:
            self.points[run_id, key] = {(m.step, m.timestamp, m.value)
                                        for m in self.client.get_metric_history(run_id, key)}
        return point in self.points[run_id, key]


def send(client, op: dict[str, Any], history: History | None = None, base: Path | None = None) -> None:
    """Send one record to the tracking store. With ``history``, skip what the store already holds. ``base``: the
    spool folder an artifact's ``file`` is relative to (else the record's own ``path`` is read)."""
    from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param, RunTag

    kind, run_id = op["op"], op["run_id"]
    if kind == "metrics":
        points = [Metric(str(k), float(v), int(ts), int(step)) for k, v, ts, step in op["metrics"]]
        if history:
            points = [m for m in points if not history.has_point(run_id, m.key, (m.step, m.timestamp, m.value))]
        for i in range(0, len(points), 1000):
            retry_locked(client.log_batch, run_id, metrics=points[i:i + 1000])
        if history:
            for m in points:
                history.points[run_id, m.key].add((m.step, m.timestamp, m.value))
    elif kind == "params":
        have = history.run(run_id).data.params if history else {}
        params = [Param(k, str(v)) for k, v in op["params"].items() if have.get(k) != str(v)]
        for i in range(0, len(params), 100):
            retry_locked(client.log_batch, run_id, params=params[i:i + 100])
    elif kind == "tags":
        retry_locked(client.log_batch, run_id, tags=[RunTag(k, str(v)) for k, v in op["tags"].items()])
    elif kind == "inputs":
        have = {d.dataset.name for d in history.run(run_id).inputs.dataset_inputs} if history else set()
        new = [DatasetInput(Dataset(d["name"], d["digest"], d["source_type"], d["source"], d.get("schema"),
                                    d.get("profile")), [InputTag("mlflow.data.context", d["context"])])
               for d in op["datasets"] if d["name"] not in have]
        if new:
            retry_locked(client.log_inputs, run_id, datasets=new)
    elif kind == "artifact":
        path = base / op["file"] if base is not None and op.get("file") else Path(op["path"])
        retry_locked(client.log_artifact, run_id, str(path), op["artifact_path"])
    elif kind == "end":
        retry_locked(client.set_terminated, run_id, op["status"], int(op["end_time"]))
    elif kind == "refresh":  # from the stage's project folder, if it still holds that stage's outputs
        from contextlib import chdir

        from omegaconf import OmegaConf

        from xfer.data.paths import RUNS
        from xfer.track.summary import refresh

        project = Path(op["project"])
        try:
            same = json.loads((project / RUNS / f"{op['stage']}.json").read_text())["run_id"] == op["stage_run_id"]
        except (OSError, ValueError, KeyError):
            same = False
        if not same:  # e.g. a DVC temp workspace since deleted: the next stage of that pipeline summarizes it
            retry_locked(client.set_terminated, run_id, "FINISHED")
            return
        cfg = OmegaConf.create(op["cfg"])
        if project.resolve() == Path.cwd().resolve():  # the stage itself (its recorder's thread: no chdir)
            refresh(client, run_id, op["stage"], op["pipeline_id"], cfg, "FINISHED")
        else:  # a replay from elsewhere (xfer sync, another workspace's stage)
            with chdir(project):
                refresh(client, run_id, op["stage"], op["pipeline_id"], cfg, "FINISHED")
    else:
        raise SpoolError(f"unknown record kind {kind!r}")


def pending() -> list[Path]:
    """The spools waiting in mlruns/spool/ (including incomplete ones)."""
    root = folder()
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir())


def spooled_runs() -> set[str]:
    """Ids of the runs that have records waiting (their processes are gone, yet they are not abandoned)."""
    ids = set()
    for path in pending():
        ids.add(path.name.removeprefix(".writing-").split(".")[0].rsplit("-", 1)[-1])  # <stage>-<run id>[.n]
        try:
            data = json.loads((path / "spool.json").read_text())
            ids.update(op["run_id"] for op in data["ops"] if isinstance(op, dict) and "run_id" in op)
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return ids


def replay(client, uri: str, say: Callable[[str], None] = print) -> tuple[int, int]:
    """Send every spool recorded for tracking store ``uri`` into its runs, then delete it; say one line per
    spool. Returns (replayed, left in place)."""
    done = left = 0
    with locked():
        for path in pending():
            where = _rel(path)
            try:
                data = load(path)
            except SpoolError as exc:
                say(f"tracking: {where}: {exc}; left in place (fix it, or delete it to drop these records)")
                left += 1
                continue
            if data["tracking_uri"] != uri:
                say(f"tracking: {where} is for {data['tracking_uri']}; left in place (replayed when that store "
                    "is used again)")
                left += 1
                continue
            history = History(client)
            try:
                for run_id in dict.fromkeys(op["run_id"] for op in data["ops"]):  # all there before sending any
                    history.run(run_id)
                for op in data["ops"]:
                    send(client, op, history, base=path)
            except Exception as exc:
                if not is_transient(exc):
                    say(f"tracking: {where}: the store refused it ({' '.join(str(exc).split())[:120]}); left in "
                        "place (delete it to drop these records)")
                else:
                    say(f"tracking: {where}: {uri} stopped answering during the replay; left in place, the next "
                        "replay sends the rest")
                left += 1
                continue
            shutil.rmtree(path)
            done += 1
            say(f"tracking: replayed {len(data['ops'])} records of the {data['stage']} run "
                f"{data['run_id'][:8]} into {uri}")
    return done, left


def main(argv: list[str] | None = None) -> int:
    """``xfer sync``: replay the spool into the tracking store now (exit 0: nothing left; 1: spools left)."""
    import sys

    from xfer import XferError
    from xfer.core.args import Parser

    ap = Parser(prog="xfer sync", description="send to MLflow the records that stages kept in mlruns/spool/ "
                "while the tracking server did not answer (the next stage that reaches it does the same)")
    ap.add_argument("--list", action="store_true", help="only list the waiting spools, send nothing")
    args = ap.parse_args(argv)
    if args.list:
        for path in pending():
            try:
                data = load(path)
                print(f"{_rel(path)}: {len(data['ops'])} records of the {data['stage']} run {data['run_id'][:8]} "
                      f"for {data['tracking_uri']}")
            except SpoolError as exc:
                print(f"{_rel(path)}: {exc}")
        return 0
    try:
        import mlflow

        from xfer.track.store import check_server, tracking_uri

        uri = tracking_uri()
        if not pending():
            print("tracking: nothing to replay (mlruns/spool/ is empty)")
            return 0
        check_server(uri)
        done, left = replay(mlflow.MlflowClient(uri), uri)
    except XferError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 1 if left else 0

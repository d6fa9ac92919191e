"""The tracking spool (xfer.track.spool) and the non-blocking recorder (xfer.track.recorder), on a SQLite store:
records replay into the same run exactly once; a corrupt or partial spool is one line and left whole."""

from __future__ import annotations

import json
import threading

import pytest

from xfer.track import spool
from xfer.track.recorder import Recorder


@pytest.fixture
def store(project):
    import mlflow

    uri = f"sqlite:///{project}/mlruns/mlflow.db"
    client = mlflow.MlflowClient(uri)
    exp = client.create_experiment("spool")
    parent = client.create_run(exp, tags={"role": "pipeline"}).info.run_id
    run = client.create_run(exp, tags={"mlflow.parentRunId": parent}).info.run_id
    return {"uri": uri, "client": client, "run": run, "parent": parent, "root": project}


def records(store, artifact):
    run = store["run"]
    return [{"op": "params", "run_id": run, "params": {"lr": "0.001", "epochs": "3"}},
            *({"op": "metrics", "run_id": run, "metrics": [["loss", 1.0 / (e + 1), 1000 + e, e],
                                                           ["val_accuracy", 0.5 + e / 10, 1000 + e, e]]}
              for e in range(3)),
            {"op": "tags", "run_id": run, "tags": {"weights_sha256": "abc"}},
            {"op": "artifact", "run_id": run, "path": str(artifact), "artifact_path": "keras_model"},
            {"op": "end", "run_id": run, "status": "FINISHED", "end_time": 5000}]


def write_spool(store, tmp_path):
    artifact = tmp_path / "model.keras"
    artifact.write_bytes(b"model bytes")
    header = {"tracking_uri": store["uri"], "stage": "finetune", "run_id": store["run"],
              "parent_run_id": store["parent"]}
    return spool.write(header, records(store, artifact)), artifact


def history(store):
    client, run = store["client"], store["run"]
    return {k: sorted((m.step, m.timestamp, m.value) for m in client.get_metric_history(run, k))
            for k in ("loss", "val_accuracy")}


def test_a_spool_replays_into_the_same_run_exactly_once(store, tmp_path):
    client, run = store["client"], store["run"]
    path, artifact = write_spool(store, tmp_path)
    (tmp_path / "new").write_bytes(b"rewritten by the next pipeline")
    (tmp_path / "new").rename(artifact)  # as outputs are written (temp, rename): the spool kept its bytes
    client.log_batch(run, metrics=[__import__("mlflow").entities.Metric("loss", 1.0, 1000, 0)])  # sent in part
    lines = []
    assert spool.replay(client, store["uri"], say=lines.append) == (1, 0), lines
    assert len(lines) == 1 and "replayed 7 records of the finetune run" in lines[0]
    assert not path.exists()
    got = client.get_run(run)
    assert got.info.status == "FINISHED" and got.info.end_time == 5000
    assert got.data.params == {"lr": "0.001", "epochs": "3"} and got.data.tags["weights_sha256"] == "abc"
    assert got.data.tags["mlflow.parentRunId"] == store["parent"]
    assert history(store) == {"loss": [(0, 1000, 1.0), (1, 1001, 0.5), (2, 1002, 1 / 3)],
                              "val_accuracy": [(0, 1000, 0.5), (1, 1001, 0.6), (2, 1002, 0.7)]}
    local = client.download_artifacts(run, "keras_model/model.keras", str(tmp_path / "dl"))
    assert open(local, "rb").read() == b"model bytes"
    before = history(store)
    assert spool.replay(client, store["uri"], say=lines.append) == (0, 0)  # the second replay adds nothing
    assert history(store) == before


def test_a_replay_cut_short_is_finished_by_the_next_without_duplicates(store, tmp_path, monkeypatch):
    client = store["client"]
    path, _ = write_spool(store, tmp_path)
    real, calls = spool.send, []

    def flaky(client, op, history=None, base=None):
        calls.append(op["op"])
        if len(calls) == 3:  # the server goes away after two records
            raise ConnectionError("server went away")
        return real(client, op, history, base)

    monkeypatch.setattr(spool, "send", flaky)
    lines = []
    assert spool.replay(client, store["uri"], say=lines.append) == (0, 1)
    assert path.exists() and "stopped answering" in lines[0] and len(lines) == 1
    monkeypatch.setattr(spool, "send", real)
    assert spool.replay(client, store["uri"], say=lines.append) == (1, 0)
    assert [len(v) for v in history(store).values()] == [3, 3]
    assert client.get_run(store["run"]).info.status == "FINISHED"


def _truncate(path):
    text = (path / "spool.json").read_text()
    (path / "spool.json").write_text(text[: len(text) // 2])


def _drop_artifact(path):
    next((path / "files").rglob("model.keras")).unlink()


def _change_artifact(path):
    next((path / "files").rglob("model.keras")).write_bytes(b"model bytez")


def _bad_record(path):
    data = json.loads((path / "spool.json").read_text())
    data["ops"][2] = {"op": "metrics", "run_id": data["run_id"]}  # no metrics field
    (path / "spool.json").write_text(json.dumps(data))


def _interrupted_write(path):
    path.rename(path.with_name(f".writing-{path.name}"))


def _no_manifest(path):
    (path / "spool.json").unlink()


@pytest.mark.parametrize("damage, words", [(_truncate, "corrupt spool.json"), (_drop_artifact, "is missing"),
                                           (_change_artifact, "differs from what was recorded"),
                                           (_bad_record, "record 2 is not a well-formed record"),
                                           (_interrupted_write, "stopped while writing"),
                                           (_no_manifest, "spool.json is missing")])
def test_a_corrupt_or_partial_spool_is_one_line_and_left_in_place(store, tmp_path, damage, words):
    path, _ = write_spool(store, tmp_path)
    damage(path)
    left = [p for p in spool.pending()]
    before = {p: sorted(f.relative_to(p) for f in p.rglob("*")) for p in left}
    lines = []
    assert spool.replay(store["client"], store["uri"], say=lines.append) == (0, 1)
    assert len(lines) == 1 and "\n" not in lines[0] and words in lines[0] and "left in place" in lines[0], lines
    assert {p: sorted(f.relative_to(p) for f in p.rglob("*")) for p in spool.pending()} == before
    run = store["client"].get_run(store["run"])
    assert run.info.status == "RUNNING" and not run.data.metrics and not run.data.params  # nothing of it applied
    assert store["run"] in spool.spooled_runs()  # not closed as abandoned while its records wait


def test_a_spool_for_another_store_waits_for_it(store, tmp_path):
    path, _ = write_spool(store, tmp_path)
    lines = []
    assert spool.replay(store["client"], "http://127.0.0.1:1", say=lines.append) == (0, 1)
    assert path.exists() and "is for sqlite:" in lines[0]


class Outage:
    """A client whose store does not answer until ``back`` is set (the calls block, as MLflow's retries do)."""

    def __init__(self, real):
        self.real, self.back, self.waiting = real, threading.Event(), threading.Event()

    def __getattr__(self, name):
        def call(*args, **kwargs):
            self.waiting.set()
            self.back.wait()
            return getattr(self.real, name)(*args, **kwargs)

        return call


def test_the_recorder_never_waits_for_the_store_and_spools_what_it_did_not_take(store, tmp_path):
    client = Outage(store["client"])
    rec = Recorder(client, store["run"], store["parent"], "finetune", store["uri"])
    def epochs():
        for epoch in range(3):
            rec.log_metrics({"loss": 1.0 / (epoch + 1), "val_accuracy": 0.5 + epoch / 10}, step=epoch)

    training = threading.Thread(target=epochs, daemon=True)
    training.start()
    training.join(30)
    assert not training.is_alive(), "logging an epoch waited for the store"
    assert client.waiting.wait(10) and not client.back.is_set()  # the first record is stuck in the store
    rec.log_params({"lr": "0.001"})
    rec.end("FINISHED")
    refresh = {"op": "refresh", "run_id": store["parent"], "stage": "finetune", "pipeline_id": "p", "cfg": {},
               "project": str(store["root"]), "stage_run_id": store["run"]}
    path = rec.close(0.2, [refresh])
    assert path is not None and path.parent == store["root"] / "mlruns" / "spool"
    kinds = [op["op"] for op in spool.load(path)["ops"]]
    assert kinds == ["metrics", "metrics", "metrics", "params", "end", "refresh"]  # the one in flight, too
    assert not rec.staging.exists()
    client.back.set()  # the record in flight reaches the store after the stage gave up on it
    rec._thread.join(10)
    assert [len(v) for v in history(store).values()] == [1, 1]


def test_the_recorder_sends_in_order_when_the_store_answers(store, tmp_path):
    artifact = tmp_path / "curves.csv"
    artifact.write_text("epoch,loss\n0,1.0\n")
    rec = Recorder(store["client"], store["run"], store["parent"], "finetune", store["uri"])
    rec.log_params({"lr": "0.001"})
    for epoch in range(3):
        rec.log_metrics({"loss": 1.0 / (epoch + 1), "val_accuracy": 0.5 + epoch / 10}, step=epoch)
    rec.log_artifact(artifact, "plots")
    artifact.write_text("rewritten after logging\n")  # what was logged is what gets sent
    rec.log_bytes(b"{}", "report/evaluate.json", run_id=store["parent"])
    rec.end("FINISHED")
    assert rec.close(30) is None and not spool.pending()
    run = store["client"].get_run(store["run"])
    assert run.info.status == "FINISHED" and run.data.params == {"lr": "0.001"}
    assert [len(v) for v in history(store).values()] == [3, 3]
    local = store["client"].download_artifacts(store["run"], "plots/curves.csv", str(tmp_path / "dl"))
    assert open(local).read() == "epoch,loss\n0,1.0\n"
    assert [f.path for f in store["client"].list_artifacts(store["parent"], "report")] == ["report/evaluate.json"]


def test_a_record_the_store_refuses_fails_the_stage_as_before(store):
    from mlflow.exceptions import MlflowException

    store["client"].log_param(store["run"], "lr", "0.1")
    rec = Recorder(store["client"], store["run"], store["parent"], "finetune", store["uri"])
    rec.log_params({"lr": "0.001"})  # a param cannot change: a 4xx answer, waiting would not help
    with pytest.raises(MlflowException):
        rec.close(30)
    assert not spool.pending()


def test_the_next_stage_replays_the_spool_before_it_closes_abandoned_runs(store, tmp_path, tiny_cfg, monkeypatch,
                                                                            capsys):
    from xfer.track.runs import experiment_name, stage_run

    client = store["client"]
    exp = client.create_experiment(experiment_name(tiny_cfg))  # where the next stage closes abandoned runs
    store = {**store, "run": client.create_run(exp, tags={"mlflow.parentRunId": store["parent"]}).info.run_id}
    run = store["run"]
    dead = {"xfer.host": __import__("socket").gethostname(), "xfer.pid": "999999", "xfer.pid_started": "1"}
    for key, value in dead.items():  # its process is gone: without the spool it would be closed as KILLED
        client.set_tag(run, key, value)
    path, _ = write_spool(store, tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store["uri"])
    monkeypatch.setenv("XFER_PIPELINE_ID", "next")
    monkeypatch.setenv("XFER_TRACKING_WAIT", "30")
    with stage_run("download", tiny_cfg, ["data"]):
        pass
    assert not path.exists() and "replayed 7 records" in capsys.readouterr().err
    got = client.get_run(run)
    assert got.info.status == "FINISHED" and "xfer.closed_because" not in got.data.tags
    assert [len(v) for v in history(store).values()] == [3, 3]


def test_a_summary_refresh_whose_project_is_gone_only_ends_the_parent(store, tmp_path):
    header = {"tracking_uri": store["uri"], "stage": "finetune", "run_id": store["run"],
              "parent_run_id": store["parent"]}
    refresh = {"op": "refresh", "run_id": store["parent"], "stage": "finetune", "pipeline_id": "p", "cfg": {},
               "project": str(tmp_path / "deleted-dvc-temp-workspace"), "stage_run_id": store["run"]}
    spool.write(header, [refresh])
    assert spool.replay(store["client"], store["uri"], say=lambda line: None) == (1, 0)
    parent = store["client"].get_run(store["parent"])
    assert parent.info.status == "FINISHED" and "stage.finetune" not in parent.data.tags

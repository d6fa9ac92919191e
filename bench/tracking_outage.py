"""Benchmark: epoch time of a short fine-tuning with the MLflow server up, and with it down for the whole fit,
through the stage's recorder (xfer.track.recorder: per-epoch metrics queued) and, for comparison, with the old
synchronous logging (each epoch's ``log_metrics`` waits for MLflow's client retries).

usage: python bench/tracking_outage.py [--epochs 5] [--images 512] [--size 96] [--retries 2] [--backoff 1]
A real ``mlflow server`` (SQLite backend, temp folder, 127.0.0.1) is started, then SIGKILLed for the "down" rows.
The model: MobileNetV2 (weights=None, alpha 0.35) top unfrozen with a dense head on generated images; the first
epoch of each fit (tracing) is left out of the mean. ``--retries/--backoff`` shorten MLflow's client retries for
the synchronous row (its defaults, 7 retries with backoff 2, make each epoch wait minutes).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(folder: Path, port: int) -> subprocess.Popen:
    import requests

    cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
           "--backend-store-uri", f"sqlite:///{folder}/mlflow.db", "--artifacts-destination", str(folder / "art")]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                            env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if requests.get(f"http://127.0.0.1:{port}/health", timeout=1).ok:
                return proc
        except requests.RequestException:
            time.sleep(0.5)
    raise SystemExit("mlflow server did not start")


def model_and_data(n: int, size: int):
    import keras

    rng = np.random.default_rng(0)
    x = rng.uniform(0, 255, (n, size, size, 3)).astype("float32")
    y = (x[:, : size // 2].mean(axis=(1, 2, 3)) > x[:, size // 2 :].mean(axis=(1, 2, 3))).astype("float32")
    base = keras.applications.MobileNetV2(input_shape=(size, size, 3), alpha=0.35, include_top=False, weights=None,
                                          pooling="avg")
    for layer in base.layers[:-20]:
        layer.trainable = False
    inputs = keras.Input((size, size, 3))
    x_in = keras.applications.mobilenet_v2.preprocess_input(inputs)
    out = keras.layers.Dense(1, activation="sigmoid")(base(x_in, training=False))
    model = keras.Model(inputs, out)
    model.compile(optimizer=keras.optimizers.Adam(1e-4), loss="binary_crossentropy", metrics=["accuracy"])
    return model, x, y


def fit(model, x, y, epochs: int, callback) -> list[float]:
    split = len(x) * 3 // 4
    model.fit(x[:split], y[:split], validation_data=(x[split:], y[split:]), epochs=epochs, batch_size=32,
              callbacks=[callback], verbose=0)
    return callback.seconds


def synchronous_logger(run_id: str):
    """The callback as it was before the recorder: log each epoch and wait for the store."""
    import keras
    import mlflow

    class Sync(keras.callbacks.Callback):
        seconds: list[float] = []

        def on_epoch_begin(self, epoch, logs=None):
            self.started = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            try:
                mlflow.MlflowClient().log_batch(run_id, metrics=[mlflow.entities.Metric(k, float(v),
                                                int(time.time() * 1000), epoch) for k, v in (logs or {}).items()])
            except Exception:  # the stage died here before; the bench measures the wait
                pass
            self.seconds.append(time.perf_counter() - self.started)

    return Sync()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--images", type=int, default=512)
    ap.add_argument("--size", type=int, default=96)
    ap.add_argument("--retries", default="2")
    ap.add_argument("--backoff", default="1")
    args = ap.parse_args()
    os.environ.update(MLFLOW_HTTP_REQUEST_MAX_RETRIES=args.retries, MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR=args.backoff,
                      MLFLOW_HTTP_REQUEST_TIMEOUT="10", MLFLOW_DISABLE_TELEMETRY="true")
    import mlflow

    from xfer.core.runtime import quiet_mlflow, seed_everything
    from xfer.track import recorder as rec_mod
    from xfer.track.recorder import Recorder
    from xfer.track.runs import epoch_logger

    quiet_mlflow()
    seed_everything(0, False)
    work = Path(tempfile.mkdtemp(prefix="xfer-bench-outage-"))
    project = work / "proj"  # the recorder's spool and copies live under a project's mlruns/
    (project / "mlruns").mkdir(parents=True)
    (project / "dvc.yaml").write_text("stages: {}\n")
    os.chdir(project)
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    server = start_server(work, port)
    mlflow.set_tracking_uri(uri)
    client = mlflow.MlflowClient(uri)
    exp = client.create_experiment("bench-outage")
    model, x, y = model_and_data(args.images, args.size)
    model.fit(x[:64], y[:64], validation_data=(x[64:96], y[64:96]), epochs=1, batch_size=32, verbose=0)  # tracing
    rows = {}

    def recorded(name: str, run_id: str) -> None:
        rec = Recorder(client, run_id, run_id, "bench", uri)
        rec_mod.activate(rec)
        started = time.perf_counter()
        seconds = fit(model, x, y, args.epochs, epoch_logger())
        total = time.perf_counter() - started
        rec.end("FINISHED")
        where = rec.close(5.0)
        rec_mod.activate(None)
        rows[name] = (seconds, total, "spooled" if where else "sent")
        if where:
            shutil.rmtree(where)

    runs = [client.create_run(exp).info.run_id for _ in range(3)]  # ids come from the server, before the outage
    recorded("server up, recorder", runs[0])
    os.killpg(server.pid, signal.SIGKILL)  # absent from here on: connections refused
    server.wait()
    time.sleep(1)
    recorded("server down, recorder", runs[1])
    started = time.perf_counter()
    seconds = fit(model, x, y, args.epochs, synchronous_logger(runs[2]))
    rows[f"server down, synchronous (retries {args.retries}, backoff {args.backoff})"] = (
        seconds, time.perf_counter() - started, "lost")
    shutil.rmtree(work, ignore_errors=True)

    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    print(f"{args.epochs} epochs, {args.images} images {args.size} px, MobileNetV2 0.35 top 20 layers; CPU: {cpu}, "
          f"{os.cpu_count()} cores")
    base = np.mean(rows["server up, recorder"][0][1:])
    print("| run | mean epoch s (epochs 2+) | vs server up | fit s | records |")
    print("|---|---|---|---|---|")
    for name, (secs, total, fate) in rows.items():
        mean = float(np.mean(secs[1:]))
        print(f"| {name} | {mean:.2f} | {mean / base:.2f}x | {total:.1f} | {fate} |")


if __name__ == "__main__":
    main()

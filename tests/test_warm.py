"""Warm starts (xfer.core.warm): `python -m stages.<name>` handed to a process with TensorFlow & co. imported;
the same outputs, exit codes, signals and MLflow record as a cold process; the project's code imported fresh."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from tests.conftest import TINY, tiny_project

# A stage-like module: what its process sees, then the exit code it was asked for.
PROBE = '''import os, sys
from xfer.core import warm
print("served" if warm.served() else "cold", "preloaded" if "tensorflow" in sys.modules else "bare",
      os.getcwd(), " ".join(sys.argv[1:]), os.environ.get("PROBE_VALUE"), os.getpid(), VERSION, flush=True)
print("to stderr", file=sys.stderr)
raise SystemExit(int(sys.argv[1]))
'''
# Whether MLflow's map of installed packages (log_model's first, slowest step) is there before the stage begins.
MAPPED = '''import sys
requirements_utils = sys.modules.get("mlflow.utils.requirements_utils")
print("mapped" if requirements_utils and requirements_utils._MODULES_TO_PACKAGES else "unmapped")
'''
# A stage under run_cli that waits to be interrupted.
SLEEPER = '''from xfer.core.config import run_cli


def main(cfg):
    import os, time
    print("ready", os.getpid(), flush=True)
    for _ in range(1200):  # short sleeps: CPython misses a signal that lands just before a long sleep() begins
        time.sleep(0.1)


if __name__ == "__main__":
    run_cli(main)
'''


@pytest.fixture(scope="module")
def warm(tmp_path_factory):
    """A tiny project (download, split, featurize done) with two extra modules in stages/, and the environment
    of its stage processes with a warm folder of its own; its warm processes are stopped at the end."""
    base = tmp_path_factory.mktemp("warm")
    with tiny_project(base / "proj", ["download", "split", "featurize"], "warm") as (root, _):
        (root / "stages" / "probe.py").write_text(PROBE.replace("VERSION", "'v1'"))
        (root / "stages" / "sleeper.py").write_text(SLEEPER)
        (root / "stages" / "mapped.py").write_text(MAPPED)
        env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{root}/mlflow.db", "XFER_PIPELINE_ID": "warm",
               "XFER_WARM_DIR": str(base / "sockets"), "XFER_WARM": "1"}
        env.pop("DVC_ROOT", None)
        yield root, env
        stop(env)


def stop(env: dict) -> None:
    subprocess.run([sys.executable, "-m", "xfer", "warm", "stop"], env=env, capture_output=True, timeout=60)


def stage(root: Path, env: dict, module: str, *args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", f"stages.{module}", *args], cwd=root, env=env, capture_output=True,
                          text=True, timeout=600, **kwargs)


def wait_until_up(env: dict, timeout: float = 180) -> None:
    folder = Path(env["XFER_WARM_DIR"])
    deadline = time.time() + timeout
    while not list(folder.glob("*.sock")):
        assert time.time() < deadline, f"no warm process came up: {[p.read_text() for p in folder.glob('*.log')]}"
        time.sleep(0.1)


def served(root: Path, env: dict) -> list[str]:
    """Run the probe until a warm process answers it; return what the warm child printed."""
    wait_until_up(env)
    out = stage(root, env, "probe", "0", "x=1")
    assert out.returncode == 0, out.stderr
    return out.stdout.split()


def test_a_stage_goes_to_a_warm_child_that_sees_its_argv_cwd_env_and_streams(warm):
    root, env = warm
    first = stage(root, {**env, "PROBE_VALUE": "a"}, "probe", "3", "key=value")
    assert first.returncode == 3  # no warm process yet: cold, and one is started for the next stage
    assert first.stdout.split()[:2] == ["cold", "bare"]
    words = served(root, env)
    assert words[:2] == ["served", "preloaded"]  # TensorFlow was imported before this stage began
    child = stage(root, {**env, "PROBE_VALUE": "b c"}, "probe", "5", "key=value")
    assert child.returncode == 5, child.stderr  # the stage's exit code, through the waiting command
    assert child.stdout.split()[:7] == ["served", "preloaded", str(root), "5", "key=value", "b", "c"]
    assert child.stderr.strip() == "to stderr"
    pid = int(child.stdout.split()[7])
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


def test_a_large_environment_reaches_the_warm_child_whole(warm):
    root, env = warm
    wait_until_up(env)
    big = "x" * 120_000  # near Linux's limit for one variable: a request of several socket buffers
    out = stage(root, {**env, "PROBE_VALUE": big}, "probe", "0")
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[:2] == ["served", "preloaded"] and big in out.stdout.split()


def test_a_warm_child_imports_the_projects_code_fresh(warm):
    root, env = warm
    assert served(root, env)[-1] == "v1"
    (root / "stages" / "probe.py").write_text(PROBE.replace("VERSION", "'v2'"))
    assert served(root, env)[-1] == "v2"  # an edit takes effect at once, as in a cold process
    cold = stage(root, {**env, "XFER_WARM": "0"}, "probe", "0")
    assert cold.stdout.split()[:2] == ["cold", "bare"]  # XFER_WARM=0: never handed over


def test_a_warm_child_finds_mlflows_package_map_made(warm):
    root, env = warm
    wait_until_up(env)
    assert stage(root, env, "mapped").stdout.split() == ["mapped"]
    assert stage(root, {**env, "XFER_WARM": "0"}, "mapped").stdout.split() == ["unmapped"]


def test_installing_or_removing_a_package_means_another_warm_process(tmp_path, monkeypatch):
    from xfer.core import warm

    site = tmp_path / "lib" / "site-packages"
    site.mkdir(parents=True)
    monkeypatch.setattr(sys, "path", [*sys.path, str(site)])
    before = warm.key()
    assert warm.key() == before
    (site / "newpkg-1.0.dist-info").mkdir()
    os.utime(site, ns=(time.time_ns(), os.stat(site).st_mtime_ns + 1_000_000))
    assert warm.key() != before


def test_a_warm_stage_writes_the_same_bytes_and_records_how_it_started(warm):
    import mlflow

    root, env = warm
    wait_until_up(env)
    cold = stage(root, {**env, "XFER_WARM": "0"}, "train_head", *TINY)
    assert cold.returncode == 0, cold.stderr
    head = (root / "models" / "head.keras").read_bytes()
    hot = stage(root, env, "train_head", *TINY)
    assert hot.returncode == 0, hot.stderr
    assert (root / "models" / "head.keras").read_bytes() == head
    assert hot.stdout.strip().splitlines() == [hot.stdout.strip()] and hot.stdout.startswith("train_head: {")
    for noise in ("absl", "cuda", "cuInit", "oneDNN", "Warning", "WARNING", "INFO", "Traceback"):
        assert noise not in hot.stderr and noise not in cold.stderr, f"{noise!r}:\n{cold.stderr}\n{hot.stderr}"
    client = mlflow.MlflowClient(env["MLFLOW_TRACKING_URI"])
    exp = client.get_experiment_by_name("synthetic")
    runs = client.search_runs([exp.experiment_id], "tags.stage = 'train_head'", order_by=["attributes.start_time"])
    assert [r.data.tags["xfer.start"] for r in runs[-2:]] == ["cold", "warm"]
    assert all(r.info.status == "FINISHED" for r in runs[-2:])


def test_an_expected_error_is_one_line_through_a_warm_child(warm):
    root, env = warm
    wait_until_up(env)
    out = stage(root, env, "train_head", "head.nope=1")
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [out.stderr.strip()] and "head.nope" in out.stderr


def sleeper(root: Path, env: dict) -> tuple[subprocess.Popen, int]:
    wait_until_up(env)
    proc = subprocess.Popen([sys.executable, "-m", "stages.sleeper"], cwd=root, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    line = proc.stdout.readline().split()
    assert line[:1] == ["ready"], proc.stderr.read()
    child = int(line[1])
    assert child != proc.pid and psutil.Process(child).ppid() != proc.pid  # a warm child, not ours
    return proc, child


@pytest.mark.parametrize("sig, code, word", [(signal.SIGTERM, 143, "terminated"), (signal.SIGINT, 130, "interrupted")])
def test_signals_to_the_waiting_command_reach_the_warm_stage(warm, sig, code, word):
    root, env = warm
    proc, child = sleeper(root, env)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == code, err
    assert f"{word}; partial outputs were discarded" in err and "Traceback" not in err
    assert not psutil.pid_exists(child) or psutil.Process(child).status() == psutil.STATUS_ZOMBIE


def test_a_signal_the_main_thread_never_sees_still_ends_the_wait_at_once():
    """The waiting command's wait for the stage's reply ends for a signal the kernel hands to another thread (as
    for one landing just before a blocking call): the handler runs then, not when the stage ends."""
    from xfer.core.warm import _wait, signal_wakeup

    conn, stage_end = socket.socketpair()
    go = threading.Event()
    other = threading.Thread(target=lambda: go.wait() and os.kill(os.getpid(), signal.SIGUSR1), daemon=True)
    other.start()  # before the block below: this thread still takes SIGUSR1
    watchdog = threading.Timer(20, stage_end.send, (b"late",))  # what the old wait needed: the stage's own end
    old_handler = signal.signal(signal.SIGUSR1, lambda *_: stage_end.send(b"now"))  # "forward": the stage ends
    old_fd = signal.set_wakeup_fd(-1)
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})
    try:
        wake, _keep = signal_wakeup()
        watchdog.start()
        start = time.monotonic()
        go.set()
        _wait(conn, wake)
        assert conn.recv(8) == b"now" and time.monotonic() - start < 10
    finally:
        watchdog.cancel()
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGUSR1})
        signal.signal(signal.SIGUSR1, old_handler)
        signal.set_wakeup_fd(old_fd)


def test_a_killed_waiting_command_takes_its_warm_stage_with_it(warm):
    root, env = warm
    proc, child = sleeper(root, env)
    proc.kill()  # SIGKILL: nothing can be forwarded; the warm process sees the command gone
    proc.communicate(timeout=60)
    deadline = time.time() + 30
    while psutil.pid_exists(child) and psutil.Process(child).status() != psutil.STATUS_ZOMBIE:
        assert time.time() < deadline, "the warm stage outlived its command"
        time.sleep(0.05)


def test_status_and_stop(warm):
    root, env = warm
    wait_until_up(env)
    status = subprocess.run([sys.executable, "-m", "xfer", "warm", "status"], cwd=root, env=env, capture_output=True,
                            text=True, timeout=60)
    assert status.returncode == 0 and "1 warm process(es)" in status.stdout, status.stdout + status.stderr
    pid = int(status.stdout.split("pid ")[1].split()[0])
    stop(env)
    assert not psutil.pid_exists(pid) and not list(Path(env["XFER_WARM_DIR"]).glob("*.sock"))
    assert stage(root, env, "probe", "0").stdout.split()[0] == "cold"  # and the next stage starts one again
    wait_until_up(env)


def test_an_idle_warm_process_ends_by_itself(warm, tmp_path):
    root, env = warm
    env = {**env, "XFER_WARM_DIR": str(tmp_path / "idle"), "XFER_WARM_IDLE": "1"}
    stage(root, env, "probe", "0")
    wait_until_up(env)
    deadline = time.time() + 30
    while list(Path(env["XFER_WARM_DIR"]).glob("*.sock")):
        assert time.time() < deadline, "the idle warm process is still there"
        time.sleep(0.1)
    assert not list(Path(env["XFER_WARM_DIR"]).glob("*.pid"))


def test_the_key_follows_import_time_settings_not_per_run_ones(monkeypatch):
    from xfer.core import warm

    base = warm.key()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///elsewhere.db")
    monkeypatch.setenv("DVC_STAGE", "train_head")
    monkeypatch.setenv("XFER_PIPELINE_ID", "other")
    assert warm.key() == base  # read by each child from its own environment
    monkeypatch.setenv("TF_ENABLE_ONEDNN_OPTS", "0")
    assert warm.key() != base  # read when TensorFlow is imported: another warm process

"""Warm starts for stage processes: one background process per user and environment that has imported
TensorFlow, Keras, MLflow, scikit-learn and pandas once, and forks a fresh child for each ``python -m stages.<name>``.

Without it every stage of every ``dvc repro`` pays those imports (about 5 s on 2 cores) before doing any work.
The stage command stays ``python -m stages.<name>``: ``stages/__init__.py`` calls :func:`delegate`, which hands
the command (argv, working directory, environment, umask, stdin/stdout/stderr) over a Unix socket to the warm
process if one runs for this environment, and exits with the stage's exit code. Otherwise it starts one in the
background (for the next stage) and the stage runs cold, as before.

What a child runs is what a cold process would run: the project's own modules (``xfer``, ``stages``, ...) are
never preloaded (a child imports them fresh from its working directory, so an edit takes effect at once); only
third-party libraries are, and a change to any of them (a ``pip install``), to the Python, its flags or an
import-time environment variable (``TF_*``, ``KERAS_*``, ``ONEDNN_*``, ``PYTHONPATH``, ...) means another warm
process. The warm process never runs a TensorFlow op, so every child sets up TensorFlow's devices and threads
itself. Signals reach the child (Ctrl-C, SIGTERM from ``dvc queue kill``); if the waiting command is killed
outright, the child is killed too.

``XFER_WARM=0`` turns it off; ``XFER_WARM_IDLE`` (seconds, default 1200) ends a warm process nobody used for that
long; ``XFER_WARM_DIR`` is where the sockets live. ``xfer warm status|stop`` lists or stops them. Linux only
(elsewhere stages run cold)."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import signal
import socket
import struct
import sys
import time
from pathlib import Path

IDLE_S = 1200.0
# Third-party modules the stages import; what is preloaded and watched for changes (a new version: new process).
PRELOAD = ("numpy", "pandas", "omegaconf", "psutil", "PIL.Image", "matplotlib", "matplotlib.pyplot",
           "sklearn.metrics", "sklearn.calibration", "sklearn.model_selection", "sklearn.linear_model",
           "mlflow", "mlflow.tracking", "mlflow.store.tracking.sqlalchemy_store", "mlflow.models", "mlflow.pyfunc",
           "alembic.command", "alembic.config", "git", "tqdm", "cleanlab.filter", "keras.applications")
# Environment read when these libraries are imported (the rest is read later, in the child, from its own env).
IMPORT_ENV = ("TF_", "ONEDNN_", "DNNL_", "XLA_", "KERAS_", "CUDA_", "OMP_", "MKL_", "OPENBLAS_", "PYTHON", "LD_",
              "MPL", "HOME", "LANG", "LC_", "XFER_TF_LOG_LEVEL", "TZ")
PROJECT_PACKAGES = ("xfer", "stages", "tests", "bench")  # never kept from the warm process: imported fresh
CHILD_ENV = "XFER_WARM_CHILD"  # set in a served child: its own pid (so what it starts is not "served")
CLIENT_ENV = "XFER_WARM_CLIENT"  # set in a served child: the pid of the command waiting for it
# What the waiting command forwards to its stage (and SIGINT, unless ignored); a served child resets them.
FORWARDED = (signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2)


def enabled() -> bool:
    return os.environ.get("XFER_WARM", "1") != "0" and sys.platform.startswith("linux") and hasattr(socket,
                                                                                                  "send_fds")


def served() -> bool:
    """True in a stage process forked by a warm process (not in what that stage starts)."""
    return os.environ.get(CHILD_ENV) == str(os.getpid())


def folder() -> Path:
    """Where the sockets, pid files and logs live (mode 700)."""
    if os.environ.get("XFER_WARM_DIR"):
        return Path(os.environ["XFER_WARM_DIR"])
    base = os.environ.get("XDG_RUNTIME_DIR") or "/tmp"
    return Path(base) / f"xfer-warm-{os.getuid()}"


def _origin(name: str) -> str:
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return ""
    if spec is None or not spec.origin:
        return ""
    try:
        return f"{spec.origin}:{os.stat(spec.origin).st_mtime_ns}"
    except OSError:
        return spec.origin


def key() -> str:
    """What a warm process must share with a cold one for their children to be alike: the Python, its flags and
    path, the import-time environment, this module's code, the libraries it preloads and the set installed."""
    env = sorted((k, v) for k, v in os.environ.items() if k.startswith(IMPORT_ENV))
    roots = sorted({name.split(".")[0] for name in PRELOAD} | {"tensorflow", "keras"})
    # a pip install or uninstall of anything adds or removes a *.dist-info folder: the folder's mtime changes
    installed = [f"{p}:{os.stat(p).st_mtime_ns}" for p in sys.path[1:]
                 if p.endswith(("site-packages", "dist-packages")) and os.path.isdir(p)]
    parts = [sys.executable, sys.version, repr(sys.flags), repr(sys.warnoptions), repr(sys._xoptions),
             repr(sys.path[1:]), repr(env), Path(__file__).read_bytes().hex(), *map(_origin, roots), *installed]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]


def socket_path(k: str) -> Path:
    return folder() / f"{k}.sock"


def flush_and_exit(code: int) -> None:
    """End this process now: flush logging and the standard streams, then skip the interpreter's teardown."""
    import logging

    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


# -- messages: a 4-byte length, then JSON ------------------------------------------------------------------------

def _send(conn: socket.socket, obj: dict, fds: list[int] | None = None) -> None:
    data = json.dumps(obj).encode()
    payload = struct.pack("!I", len(data)) + data
    sent = socket.send_fds(conn, [payload], fds) if fds else 0  # the fds go with the first bytes
    conn.sendall(payload[sent:])  # sendmsg may take only part of a large request (the environment)


def _recv_exact(conn: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = conn.recv(n - len(buf))
        if not chunk:
            raise EOFError("connection closed")
        buf += chunk
    return buf


def _recv(conn: socket.socket, with_fds: int = 0) -> tuple[dict, list[int]]:
    fds: list[int] = []
    if with_fds:
        head, fds, _, _ = socket.recv_fds(conn, 4, with_fds)
        if len(head) < 4:
            head += _recv_exact(conn, 4 - len(head))
    else:
        head = _recv_exact(conn, 4)
    (n,) = struct.unpack("!I", head)
    return json.loads(_recv_exact(conn, n)), fds


# -- the waiting command (the stage process DVC started) -----------------------------------------------------------

def _module_name() -> str | None:
    """``stages.x`` of ``python -m stages.x ...`` (None when this process was not started with -m)."""
    orig = list(getattr(sys, "orig_argv", []))
    if "-m" not in orig:
        return None
    i = orig.index("-m")
    return orig[i + 1] if i + 1 < len(orig) else None


def delegate() -> None:
    """Run this ``python -m stages.<name>`` process's stage in a warm child and exit with its exit code; return
    (run cold) when warm starts are off, this is a served child, or no warm process is up yet (then start one)."""
    if not enabled() or served():
        return
    module = _module_name()
    if module is None or not module.startswith("stages.") or sys.argv[:1] != ["-m"]:
        return
    k = key()
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.connect(str(socket_path(k)))
    except OSError:
        conn.close()
        start_server(k)
        return
    flush_and_exit(_serve_through(conn, module))


def _serve_through(conn: socket.socket, module: str) -> int:
    umask = os.umask(0)
    os.umask(umask)
    sigint_ignored = signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    child, pending = [], []

    def forward(signum, _frame) -> None:  # to the stage; before its pid is known, once it is
        if not child:
            pending.append(signum)
            return
        try:
            os.kill(child[0], signum)
        except ProcessLookupError:
            pass

    for signum in FORWARDED + (() if sigint_ignored else (signal.SIGINT,)):
        signal.signal(signum, forward)
    request = {"module": module, "argv": sys.argv[1:], "cwd": os.getcwd(), "env": dict(os.environ),
               "path": sys.path, "umask": umask, "sigint_ignored": sigint_ignored, "client": os.getpid()}
    sys.stdout.flush()
    sys.stderr.flush()
    fds = []
    for fd in (0, 1, 2):  # a closed one (stdin under some runners) becomes /dev/null, as for a cold child
        try:
            os.fstat(fd)
            fds.append(fd)
        except OSError:
            fds.append(os.open(os.devnull, os.O_RDWR))
    wake, _keep = signal_wakeup()
    try:
        _send(conn, request, fds)
        _wait(conn, wake)
        reply, _ = _recv(conn)
    except (OSError, EOFError):  # the warm process went away between connect and reply: run cold
        conn.close()
        if pending:
            return 128 + pending[0]
        return _cold_exec()
    child.append(int(reply["pid"]))
    for signum in pending:
        forward(signum, None)
    try:
        _wait(conn, wake)
        status, _ = _recv(conn)
    except (OSError, EOFError):
        return 1
    code = int(status["code"])
    return code if code >= 0 else 128 - code


def signal_wakeup() -> tuple[socket.socket, socket.socket]:
    """A socket that turns readable when a signal arrives (``signal.set_wakeup_fd``), and its other end to keep.

    A signal that lands just before a blocking ``recv()``, or on another thread, runs its Python handler only
    once the main thread's call returns: for the waiting command, when the stage ends. :func:`_wait` selects on
    this socket too, so the handler runs (and forwards the signal) at once."""
    wake, wake_w = socket.socketpair()
    for end in (wake, wake_w):
        end.setblocking(False)
    signal.set_wakeup_fd(wake_w.fileno(), warn_on_full_buffer=False)
    return wake, wake_w


def _wait(conn: socket.socket, wake: socket.socket) -> None:
    """Until ``conn`` has a message, run the signal handlers (forwarding) as each signal arrives."""
    import select

    while conn not in select.select([conn, wake], [], [])[0]:
        try:
            wake.recv(256)  # the handlers ran as select returned; drop their wakeup bytes
        except BlockingIOError:
            pass


def _cold_exec() -> int:
    """Become this stage's cold process (same pid, so DVC's signals still reach it): ``XFER_WARM=0``. (exec
    resets the forwarding handlers; an ignored SIGINT stays ignored.)"""
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], {**os.environ, "XFER_WARM": "0"})
    return 1  # not reached


def start_server(k: str) -> None:
    """Start the warm process for ``k`` in the background, unless one is already starting."""
    where = folder()
    try:
        where.mkdir(mode=0o700, parents=True, exist_ok=True)
        if (where / f"{k}.failed").exists():  # it could not preload in this environment: stay cold
            return
        starting = where / f"{k}.starting"
        try:
            fd = os.open(starting, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
        except FileExistsError:
            if time.time() - starting.stat().st_mtime < 120:
                return  # another stage is starting it
            starting.unlink(missing_ok=True)
            fd = os.open(starting, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
        os.close(fd)
        import subprocess

        log = open(where / f"{k}.log", "ab")  # noqa: SIM115 - handed to the child
        env = {name: value for name, value in os.environ.items() if not name.startswith(("DVC_", CHILD_ENV))}
        subprocess.Popen([sys.executable, "-m", "xfer.core.warm", k], cwd=Path(__file__).resolve().parents[2],
                         env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True,
                         close_fds=True)
        log.close()
    except OSError:
        return  # no warm start then; the stage runs cold as always


# -- the warm process ----------------------------------------------------------------------------------------------

def preload() -> None:
    """Import what the stages import, quietly, without running a TensorFlow op."""
    from xfer.core.quiet import import_tensorflow

    import_tensorflow()
    import matplotlib

    matplotlib.use("Agg")  # what xfer.track.figures picks before it imports pyplot
    for name in PRELOAD:
        try:
            importlib.import_module(name)
        except Exception:  # noqa: BLE001, S112 - an optional library missing: its stage imports it itself
            continue
    try:  # what MLflow's log_model computes on first use: every installed package's modules (about 0.7 s)
        from mlflow.utils import requirements_utils

        requirements_utils._init_modules_to_packages_map()  # noqa: SLF001 - cached module-wide, as in any process
    except Exception:  # noqa: BLE001, S110 - another MLflow: the child computes it itself
        pass
    from tensorflow.python.eager import context

    if context.context()._context_handle is not None:  # noqa: SLF001 - would share devices/threads with children
        raise RuntimeError("TensorFlow's context was initialized while preloading; not serving")


def serve(k: str, idle: float | None = None) -> None:
    """Preload, then listen on the socket for ``k`` until nobody connected for ``idle`` seconds."""
    idle = float(os.environ.get("XFER_WARM_IDLE", IDLE_S)) if idle is None else idle
    where = folder()
    path, starting = socket_path(k), where / f"{k}.starting"
    try:
        if key() != k:  # the environment changed between the client's start and ours
            return
        try:
            preload()
        except BaseException:
            (where / f"{k}.failed").write_text("preloading failed: see the log beside this file\n")
            raise
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        tmp = where / f"{k}.{os.getpid()}.tmp"
        listener.bind(str(tmp))
        os.rename(tmp, path)  # clients see a socket that already listens, never a half-made one
        listener.listen(16)
        (where / f"{k}.pid").write_text(f"{os.getpid()}\n")
    finally:
        starting.unlink(missing_ok=True)
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # sessions are reaped by the kernel
    signal.signal(signal.SIGTERM, lambda *_: _stop(listener, path, k))
    listener.settimeout(idle)
    while True:
        try:
            conn, _ = listener.accept()
        except TimeoutError:
            _stop(listener, path, k)
        except InterruptedError:
            continue
        if os.fork() == 0:
            listener.close()
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            _session(conn)
            os._exit(0)
        conn.close()


def _stop(listener: socket.socket, path: Path, k: str) -> None:
    listener.close()
    path.unlink(missing_ok=True)
    (path.parent / f"{k}.pid").unlink(missing_ok=True)
    os._exit(0)


def _session(conn: socket.socket) -> None:
    """One waiting command: fork the child that runs its stage, relay its pid and then its exit code; kill it if
    the command goes away first."""
    import select

    try:
        request, fds = _recv(conn, with_fds=3)
    except (OSError, EOFError):
        return
    child = os.fork()
    if child == 0:
        conn.close()
        _run_child(request, fds)  # never returns
    for fd in fds:
        os.close(fd)
    _send(conn, {"pid": child})
    pidfd = os.pidfd_open(child)
    while True:
        ready, _, _ = select.select([conn, pidfd], [], [])
        if pidfd in ready:
            break
        try:
            alive = conn.recv(1, socket.MSG_PEEK)
        except OSError:
            alive = b""
        if not alive:  # the command was killed (SIGKILL, a dead terminal): so is its stage
            try:
                os.killpg(child, signal.SIGKILL)
            except ProcessLookupError:
                pass
            os.waitpid(child, 0)
            return
    _, status = os.waitpid(child, 0)
    try:
        _send(conn, {"code": os.waitstatus_to_exitcode(status)})
    except OSError:
        pass


def _run_child(request: dict, fds: list[int]) -> None:
    """Become the stage process the command would have been, run the stage module as ``__main__``, exit."""
    import io
    import runpy
    import tempfile
    import traceback

    code = 1
    try:
        os.setpgid(0, 0)  # its own group: killed with whatever it starts
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
            os.close(fd)
        for signum in FORWARDED:
            signal.signal(signum, signal.SIG_DFL)
        signal.signal(signal.SIGPIPE, signal.SIG_IGN)  # as Python sets it at start-up
        signal.signal(signal.SIGINT, signal.SIG_IGN if request["sigint_ignored"] else signal.default_int_handler)
        os.umask(int(request["umask"]))
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        os.environ[CHILD_ENV] = str(os.getpid())
        os.environ[CLIENT_ENV] = str(request["client"])
        tempfile.tempdir = None
        for name in [m for m in sys.modules if m.split(".")[0] in PROJECT_PACKAGES or m == "__main__"]:
            del sys.modules[name]
        sys.path[:] = request["path"]
        for fd, name in ((0, "stdin"), (1, "stdout"), (2, "stderr")):
            stream = io.TextIOWrapper(io.FileIO(fd, "r" if fd == 0 else "w", closefd=False),
                                      encoding=getattr(sys, f"__{name}__").encoding,
                                      errors="strict" if fd < 2 else "backslashreplace",
                                      line_buffering=fd > 0 and os.isatty(fd), write_through=fd == 2)
            setattr(sys, name, stream)
            setattr(sys, f"__{name}__", stream)
        import numpy as np

        np.random.seed()  # a fresh process's global state, not the one every child of this process shares
        sys.argv = ["-m", *request["argv"]]
        try:
            runpy.run_module(request["module"], run_name="__main__", alter_sys=True)
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
            if exc.code is not None and not isinstance(exc.code, int):
                print(exc.code, file=sys.stderr)
        except KeyboardInterrupt:
            traceback.print_exc()
            code = 128 + signal.SIGINT
        except BaseException:  # noqa: BLE001 - printed as Python would, then the exit code 1
            traceback.print_exc()
            code = 1
    finally:
        if os.environ.get("XFER_FAST_EXIT", "1") == "0":  # the normal exit a cold process would have
            import atexit

            atexit._run_exitfuncs()  # noqa: SLF001 - what the interpreter's teardown runs
        flush_and_exit(code)


# -- xfer warm status|stop -------------------------------------------------------------------------------------------

def servers() -> list[tuple[str, int]]:
    """The running warm processes: (key, pid)."""
    found = []
    for pidfile in sorted(folder().glob("*.pid")):
        try:
            pid = int(pidfile.read_text())
            os.kill(pid, 0)
        except (OSError, ValueError):
            continue
        found.append((pidfile.stem, pid))
    return found


def stop_all(timeout: float = 10.0) -> int:
    """Stop every warm process of this user (in this XFER_WARM_DIR); return how many were running."""
    running = servers()
    for _, pid in running:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + timeout
    for _, pid in running:
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.05)
    for marker in folder().glob("*.failed"):
        marker.unlink(missing_ok=True)
    return len(running)


def main(argv: list[str] | None = None) -> int:
    """``xfer warm status|stop``."""
    from xfer.core.args import Parser

    parser = Parser(prog="xfer warm", description="warm stage processes (TensorFlow & co. imported once)")
    parser.add_argument("action", choices=["status", "stop"])
    args = parser.parse_args(argv)
    if args.action == "stop":
        print(f"stopped {stop_all()} warm process(es)")
        return 0
    running = servers()
    state = "on" if enabled() else "off (XFER_WARM=0)"
    print(f"warm starts: {state}; {len(running)} warm process(es) in {folder()}")
    here = key()
    for k, pid in running:
        print(f"  {k}  pid {pid}{'  (this environment)' if k == here else ''}")
    return 0


if __name__ == "__main__":
    serve(sys.argv[1])

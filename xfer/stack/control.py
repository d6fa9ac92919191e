"""Local team stack on 127.0.0.1: PostgreSQL + SeaweedFS (S3) + an MLflow server storing runs and artifacts in them.

``xfer stack up [--auth]`` starts it (data in ``<repo>/.stack/``, kept between runs), ``status``,
``down``; ``eval "$(xfer stack env)"`` points MLflow, boto3 and DVC at it."""

from __future__ import annotations

import json
import os
import secrets
import shlex
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from urllib.parse import quote

import psutil

from xfer import XferError
from xfer.core.args import Parser
from xfer.stack import services as svc

SERVICES = ("postgres", "s3", "mlflow")
DEFAULT_PORTS = {"postgres": 5433, "s3": 8333, "mlflow": 5000}
WEED_PORTS = ("master", "master_grpc", "volume", "volume_grpc", "filer", "filer_grpc", "s3_grpc")
# Secrets: environment variable (also the key in <stack dir>/credentials) -> fallback variable.
SECRETS = {"XFER_STACK_DB_PASSWORD": None, "XFER_STACK_S3_ACCESS_KEY": "AWS_ACCESS_KEY_ID",
           "XFER_STACK_S3_SECRET_KEY": "AWS_SECRET_ACCESS_KEY", "XFER_STACK_ADMIN_PASSWORD": None,
           "XFER_STACK_FLASK_SECRET_KEY": None}
STOP_TIMEOUT = 30  # s `down` waits before SIGKILL ($XFER_STACK_STOP_TIMEOUT); weed's filer drains its gRPC streams 15 s


def port_env(service: str) -> str:
    """The environment variable overriding a service's port, e.g. XFER_STACK_MLFLOW_PORT."""
    return f"XFER_STACK_{service.upper()}_PORT"


def stack_dir(option: str | None = None) -> Path:
    """``--dir``, else $XFER_STACK_DIR, else ``<repo root>/.stack``."""
    from xfer.core.config import repo_root

    chosen = option or os.environ.get("XFER_STACK_DIR")
    return Path(chosen).resolve() if chosen else repo_root() / ".stack"


def credentials(folder: Path) -> dict[str, str]:
    """The stack's secrets: from the environment, else ``<folder>/credentials`` (mode 600), else generated there."""
    path = folder / "credentials"
    saved = dict(line.split("=", 1) for line in path.read_text().splitlines() if "=" in line) if path.exists() else {}
    creds, new = {}, {}
    for var, fallback in SECRETS.items():
        value = os.environ.get(var) or os.environ.get(fallback or "") or saved.get(var)
        if not value:
            value = new[var] = ("XFER" + secrets.token_hex(8).upper()) if var.endswith("ACCESS_KEY") \
                else secrets.token_urlsafe(24)
        creds[var] = value
    if new:
        folder.mkdir(parents=True, exist_ok=True)
        path.touch(mode=0o600)
        path.write_text("".join(f"{k}={v}\n" for k, v in {**saved, **new}.items()))
    return creds


@dataclass
class Stack:
    """One stack: its folder, ports, bucket, and (while up) the pids ``up`` started, saved in state.json."""

    dir: Path
    ports: dict[str, int]
    bucket: str = "xfer"
    auth: bool = False
    procs: dict[str, list[float]] = field(default_factory=dict)  # service -> [pid, create_time]

    def log(self, service: str) -> Path:
        return self.dir / "logs" / f"{service}.log"

    def postgres(self) -> svc.Postgres:
        return svc.Postgres(self.dir / "postgres", self.ports["postgres"], self.log("postgres"))

    def url(self, service: str) -> str:
        return f"http://{svc.HOST}:{self.ports[service]}"

    def save(self) -> None:
        (self.dir / "state.json").write_text(json.dumps({**asdict(self), "dir": str(self.dir)}, indent=2))

    @classmethod
    def load(cls, folder: Path) -> Stack | None:
        state = folder / "state.json"
        return cls(**{**json.loads(state.read_text()), "dir": folder}) if state.is_file() else None

    def pid(self, service: str) -> int | None:
        """The pid of a running service this stack started (a reused pid does not count)."""
        if service == "postgres":
            return self.postgres().pid() if (self.dir / "postgres" / "postmaster.pid").exists() else None
        pid, started = self.procs.get(service, (0, 0))
        try:
            return int(pid) if svc.alive(int(pid)) and psutil.Process(int(pid)).create_time() == started else None
        except psutil.Error:
            return None

    def running(self) -> dict[str, int | None]:
        return {s: self.pid(s) for s in SERVICES}

    def group(self, service: str) -> tuple[int, float] | None:
        """The process group ``up`` started ``service`` in (its leader's pid and start time), while any process of
        it lives: a server whose main process died can leave workers holding its port."""
        pid, started = self.procs.get(service, (0, 0))
        if pid and svc.group_members(int(pid), started):
            return int(pid), started
        return None


def up(folder: Path, ports: dict[str, int], bucket: str = "xfer", auth: bool = False, timeout: float = 120) -> Stack:
    """Start whichever of PostgreSQL, SeaweedFS and MLflow is not running, leaving the running ones as they are (a
    stack that is partly up keeps its ports and bucket); what is left of a dead service (e.g. the workers of an
    MLflow server whose main process was killed) is stopped first. On failure, stop what this call started."""
    old = Stack.load(folder)
    if old and any(old.running().values()):
        if old.running()["mlflow"] and old.auth != auth:
            raise XferError(f"the stack in {folder} is running {'with' if old.auth else 'without'} basic auth; "
                            "run `xfer stack down` first to change that")
        if all(old.running().values()):
            return old
        stack = old
    else:
        stack = None
    if len(str(folder)) > 80:
        raise XferError(f"stack dir {folder} is too long for the unix sockets it holds (80 characters at most)")
    if stack is None:
        stack = Stack(folder, {**ports, **dict(zip(WEED_PORTS, svc.free_ports(len(WEED_PORTS)), strict=True))},
                      bucket, auth)
    stack.auth = auth
    running = stack.running()
    _stop_leftovers(stack, [s for s in ("mlflow", "s3") if not running[s]])
    for service in SERVICES:
        if not running[service] and svc.port_busy(stack.ports[service]):
            raise XferError(f"port {stack.ports[service]} for {service} is already in use on {svc.HOST}; choose "
                            f"another with --{service}-port or {port_env(service)}")
    for sub in ("logs", "run", "s3/master"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    if os.geteuid() == 0:  # the postgres system user must be able to enter the stack dir
        folder.chmod(folder.stat().st_mode | 0o111)
    svc.require("boto3", "boto3")
    svc.require("psycopg2", "psycopg2-binary")
    if auth:
        svc.require("flask_wtf", "mlflow[auth]")
    creds = credentials(folder)
    stack.save()
    try:
        if not running["postgres"]:
            stack.postgres().start(creds["XFER_STACK_DB_PASSWORD"])
        if not running["s3"]:
            _start_s3(stack, creds, timeout)
        if not running["mlflow"]:
            _start_mlflow(stack, creds, timeout)
    except BaseException:
        _stop_started(stack, running)
        raise
    return stack


def _stop_leftovers(stack: Stack, services: list[str]) -> None:
    """Stop the remaining processes (orphaned workers) of services whose leader is gone."""
    groups = [g for s in services if (g := stack.group(s))]
    if groups:
        svc.stop_groups(groups, _stop_timeout())
    if "s3" in services:
        svc.remove_weed_sockets(stack.ports)


def _stop_started(stack: Stack, running: dict[str, int | None]) -> None:
    """Undo a failed ``up``: stop the services it started, keep those that ran before."""
    _stop_leftovers(stack, [s for s in ("mlflow", "s3") if not running[s]])
    if not running["postgres"]:
        stack.postgres().stop()
    for s in ("mlflow", "s3"):
        if not running[s]:
            stack.procs.pop(s, None)
    stack.save()


def _stop_timeout() -> float:
    return float(os.environ.get("XFER_STACK_STOP_TIMEOUT", STOP_TIMEOUT))


def _spawn(stack: Stack, service: str, cmd: list[str], env: dict[str, str] | None = None) -> int:
    pid = svc.spawn(cmd, stack.log(service), env)
    stack.procs[service] = [pid, psutil.Process(pid).create_time()]
    stack.save()
    return pid


def _start_s3(stack: Stack, creds: dict[str, str], timeout: float) -> None:
    config = stack.dir / "s3.json"
    svc.write_s3_config(config, creds["XFER_STACK_S3_ACCESS_KEY"], creds["XFER_STACK_S3_SECRET_KEY"])
    pid = _spawn(stack, "s3", svc.weed_command(stack.dir / "s3", stack.dir / "run", stack.ports, config))
    s3 = svc.s3_client(stack.url("s3"), creds["XFER_STACK_S3_ACCESS_KEY"], creds["XFER_STACK_S3_SECRET_KEY"])
    svc.wait_until(lambda: _answers(s3.list_buckets), "s3 (SeaweedFS)", pid, stack.log("s3"), timeout)
    if stack.bucket not in [b["Name"] for b in s3.list_buckets()["Buckets"]]:
        s3.create_bucket(Bucket=stack.bucket)


def _answers(call) -> bool:  # noqa: ANN001
    try:
        call()
        return True
    except Exception:  # noqa: BLE001 - any failure means "not yet"
        return False


def _start_mlflow(stack: Stack, creds: dict[str, str], timeout: float) -> None:
    # No password in the URIs (they show in ps): libpq reads PGPASSWORD. SQLAlchemy 2.1 defaults to psycopg 3.
    db = f"postgresql+psycopg2://mlflow@{svc.HOST}:{stack.ports['postgres']}"
    # No telemetry; no job-execution workers (GenAI scoring/archival, two extra processes) unless asked for.
    env = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **os.environ, **_client_env(stack, creds, auth=False),
           "PGPASSWORD": creds["XFER_STACK_DB_PASSWORD"], "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true"}
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"{db}/mlflow",
           "--artifacts-destination", f"s3://{stack.bucket}/mlflow", "--host", svc.HOST,
           "--port", str(stack.ports["mlflow"]), "--workers", os.environ.get("XFER_STACK_MLFLOW_WORKERS", "2")]
    admin = None
    if stack.auth:
        ini = stack.dir / "basic_auth.ini"
        ini.write_text(f"[mlflow]\ndefault_permission = READ\ndatabase_uri = {db}/mlflow_auth\n"
                       f"admin_username = {_admin_user()}\n")
        admin = (_admin_user(), creds["XFER_STACK_ADMIN_PASSWORD"])
        env.update(MLFLOW_AUTH_CONFIG_PATH=str(ini), MLFLOW_AUTH_ADMIN_USERNAME=admin[0],
                   MLFLOW_AUTH_ADMIN_PASSWORD=admin[1],
                   MLFLOW_FLASK_SERVER_SECRET_KEY=creds["XFER_STACK_FLASK_SECRET_KEY"])
        cmd += ["--app-name", "basic-auth"]
    pid = _spawn(stack, "mlflow", cmd, env)
    url = f"{stack.url('mlflow')}/api/2.0/mlflow/experiments/search?max_results=1"
    svc.wait_until(lambda: svc.http_status(url, admin) != 0, "mlflow", pid, stack.log("mlflow"), timeout)
    code = svc.http_status(url, admin)
    if code != 200:
        why = " (the admin password differs from the one the auth database was created with)" if code == 401 else ""
        raise XferError(f"mlflow answered HTTP {code}{why}; see {stack.log('mlflow')}")


def _admin_user() -> str:
    return os.environ.get("XFER_STACK_ADMIN_USER", "admin")


def down(folder: Path) -> list[str]:
    """Stop what ``up`` started in ``folder`` (MLflow, SeaweedFS, PostgreSQL): each service's whole process group,
    including workers whose main process already died; the names of what was stopped."""
    stack = Stack.load(folder)
    if not stack:
        return []
    running = stack.running()
    groups = {s: g for s in ("mlflow", "s3") if (g := stack.group(s))}
    for pgid, _ in groups.values():
        svc.terminate_group(pgid)
    if running["postgres"]:
        stack.postgres().stop()  # while weed drains its streams
    svc.stop_groups(list(groups.values()), _stop_timeout())
    svc.remove_weed_sockets(stack.ports)
    stack.procs = {}
    stack.save()
    return [s for s in SERVICES if running[s] or s in groups]


def _states(stack: Stack) -> list[str]:
    return [f"{s} {'up' if pid else 'down'}" for s, pid in stack.running().items()]


def status_lines(folder: Path) -> list[str]:
    """One line per service: name, address, pid, up/down."""
    stack = Stack.load(folder)
    running = stack.running() if stack else dict.fromkeys(SERVICES)
    ports = stack.ports if stack else DEFAULT_PORTS
    return [f"{s:9} {svc.HOST}:{ports[s]:<6} pid {running[s] or '-':<8} {'up' if running[s] else 'down'}"
            + (" (basic-auth)" if s == "mlflow" and stack and stack.auth and running[s] else "")
            for s in SERVICES]


def _client_env(stack: Stack, creds: dict[str, str], auth: bool) -> dict[str, str]:
    env = {"MLFLOW_TRACKING_URI": stack.url("mlflow"), "MLFLOW_S3_ENDPOINT_URL": stack.url("s3"),
           "AWS_ACCESS_KEY_ID": creds["XFER_STACK_S3_ACCESS_KEY"],
           "AWS_SECRET_ACCESS_KEY": creds["XFER_STACK_S3_SECRET_KEY"], "AWS_DEFAULT_REGION": "us-east-1",
           # `xfer search` workers on every machine with this env fill one study in the stack's PostgreSQL
           "XFER_SEARCH_STORAGE": f"postgresql+psycopg2://mlflow:{quote(creds['XFER_STACK_DB_PASSWORD'], safe='')}"
                                  f"@{svc.HOST}:{stack.ports['postgres']}/optuna"}
    if auth:
        env.update(MLFLOW_TRACKING_USERNAME=_admin_user(), MLFLOW_TRACKING_PASSWORD=creds["XFER_STACK_ADMIN_PASSWORD"])
    return env


def env_lines(folder: Path, ports: dict[str, int] | None = None) -> list[str]:
    """``export`` lines for the stack in ``folder`` (its running ports, else ``ports``)."""
    stack = Stack.load(folder) or Stack(folder, ports or DEFAULT_PORTS)
    env = _client_env(stack, credentials(folder), stack.auth)
    return [f"export {k}={shlex.quote(v)}" for k, v in env.items()]


def dvc_lines(stack: Stack) -> list[str]:
    """The commands that make the stack's bucket this repository's DVC remote (in git-ignored config.local)."""
    return [f"dvc remote add --local -d stack s3://{stack.bucket}/dvc",
            f"dvc remote modify --local stack endpointurl {stack.url('s3')}"]


def main(argv: list[str] | None = None) -> int:
    ap = Parser(prog="xfer stack", description=__doc__.splitlines()[0])
    ap.add_argument("command", choices=["up", "down", "status", "env"])
    ap.add_argument("--dir", help="stack folder (default: $XFER_STACK_DIR, else <repo>/.stack)")
    ap.add_argument("--auth", action="store_true", help="up: MLflow basic auth (admin user from the credentials)")
    ap.add_argument("--bucket", default=os.environ.get("XFER_STACK_BUCKET", "xfer"), help="up: S3 bucket")
    ap.add_argument("--timeout", type=float, default=120, help="up: seconds to wait for each service")
    for s in SERVICES:
        ap.add_argument(f"--{s}-port", type=int, default=int(os.environ.get(port_env(s), DEFAULT_PORTS[s])),
                        help=f"up: {s} port on {svc.HOST} (${port_env(s)}, default {DEFAULT_PORTS[s]})")
    args = ap.parse_args(argv)
    ports = {s: getattr(args, f"{s}_port") for s in SERVICES}
    try:
        folder = stack_dir(args.dir)
        if args.command == "up":
            stack = up(folder, ports, args.bucket, args.auth, args.timeout)
            print("\n".join([*status_lines(folder), f"# logs in {folder / 'logs'}; the environment to use "
                             "(or: eval \"$(xfer stack env)\"):", *env_lines(folder),
                             "# DVC remote on the stack's bucket:", *dvc_lines(stack)]))
        elif args.command == "down":
            stopped = down(folder)
            print(f"stopped {', '.join(stopped)}" if stopped else f"nothing running in {folder}")
        elif args.command == "status":
            print("\n".join(status_lines(folder)))
        else:
            print("\n".join(env_lines(folder, ports)))
    except XferError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

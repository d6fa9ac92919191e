"""The ``xfer`` command: one front door for everything a user types besides ``dvc`` and ``mlflow``.

Each subcommand lives in the group that owns it and is imported only when it runs (``xfer --help`` starts in
milliseconds, no TensorFlow). This module may import every group, never a stage."""

from __future__ import annotations

import importlib
import sys

# name -> (module with main(argv), one line for `xfer --help`)
COMMANDS: dict[str, tuple[str, str]] = {
    "predict": ("xfer.nets.predict", "classify image files or folders with the trained model (CSV out, --explain)"),
    "compare": ("xfer.track.compare", "the leaderboard of the pipeline runs in MLflow, with the params that differ"),
    "search": ("xfer.nets.study", "search head and fine-tuning settings on cached features (Optuna, CV) -> a preset"),
    "params": ("xfer.core.params", "compose conf/ into params.yaml (group=option key=value overrides; --check)"),
    "stack": ("xfer.stack.control", "the local team stack: up | down | status | env"),
    "warm": ("xfer.core.warm", "the warm stage processes (TensorFlow & co. imported once): status | stop"),
    "sync": ("xfer.track.spool", "replay into MLflow the records stages kept while its server did not answer"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: xfer <command> [options]   (xfer <command> --help for its options)", "", "commands:"]
    lines += [f"  {name:<{width}}  {text}" for name, (_, text) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        what = "option" if name.startswith("-") else "command"
        print(f"xfer: error: unknown {what} '{name}'; valid commands: {', '.join(COMMANDS)} (see xfer --help)",
              file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    return int(module.main(rest) or 0)


def forward(old: str, name: str) -> None:
    """Run an old ``python -m <old>`` spelling as ``xfer <name>``, saying so once on stderr."""
    print(f"note: `python -m {old}` is now `xfer {name}`", file=sys.stderr)
    raise SystemExit(main([name, *sys.argv[1:]]))

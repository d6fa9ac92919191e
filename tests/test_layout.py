"""The house's plan: xfer/ grouped by concern, lower groups never importing higher ones, and one `xfer` command."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
GROUPS = ("core", "data", "stack", "track", "nets")
# What each group may import besides itself (and the top-level `xfer` package: XferError).
ALLOWED = {"core": set(), "data": {"core"}, "stack": {"core"}, "track": {"core", "data"},
           "nets": {"core", "data", "track"}}
TOP_LEVEL = {"__init__.py", "__main__.py", "cli.py", "compare.py", "params.py"}  # the command + old spellings


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """Every module an ``import`` or ``from ... import`` names in ``path`` (also inside functions), with its line;
    ``from xfer import x`` counts as ``xfer.x``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
            found += [(node.lineno, f"{node.module}.{a.name}") for a in node.names if node.module in ("xfer", "stages")]
    return found


def group_of(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] == "stages":
        return "stages"
    if parts[0] == "xfer" and len(parts) > 1 and parts[1] in GROUPS:
        return parts[1]
    if parts[0] == "xfer" and len(parts) > 1 and parts[1] == "cli":
        return "cli"
    return None


def violations(root: Path) -> list[str]:
    bad = []
    for group in GROUPS:
        for path in sorted((root / "xfer" / group).rglob("*.py")):
            for line, module in imported_modules(path):
                target = group_of(module)
                if target not in (None, group) and target not in ALLOWED[group]:
                    bad.append(f"{path.relative_to(root)}:{line}: xfer.{group} imports {module}")
    for path in sorted((root / "xfer").glob("*.py")):
        bad += [f"{path.relative_to(root)}:{line}: imports the stage {m}" for line, m in imported_modules(path)
                if group_of(m) == "stages"]
    return bad


def test_groups_import_only_lower_groups():
    assert violations(REPO) == []


def test_the_walk_catches_an_import_against_the_order(tmp_path):
    for group in GROUPS:
        (tmp_path / "xfer" / group).mkdir(parents=True)
    (tmp_path / "xfer" / "core" / "bad.py").write_text("def f():\n    from xfer.track.store import tracking_uri\n")
    (tmp_path / "xfer" / "data" / "worse.py").write_text("from xfer.nets import backbones\nimport stages.split\n")
    (tmp_path / "xfer" / "track" / "ok.py").write_text("from xfer.core.files import write_json\nimport numpy\n")
    assert violations(tmp_path) == [
        "xfer/core/bad.py:2: xfer.core imports xfer.track.store",
        "xfer/data/worse.py:1: xfer.data imports xfer.nets",
        "xfer/data/worse.py:2: xfer.data imports stages.split"]


def test_every_group_says_what_it_owns_and_nothing_is_left_flat():
    for group in GROUPS:
        doc = ast.get_docstring(ast.parse((REPO / "xfer" / group / "__init__.py").read_text()))
        assert doc and "import" in doc, group
    assert {p.name for p in (REPO / "xfer").glob("*.py")} == TOP_LEVEL


def test_no_import_cycles_between_modules():
    graph: dict[str, set[str]] = {}
    for path in (REPO / "xfer").rglob("*.py"):
        name = ".".join(path.relative_to(REPO).with_suffix("").parts)
        graph[name] = {m for _, m in imported_modules(path) if m.startswith("xfer.")}
    graph = {k: {m for m in v if m in graph and m != k} for k, v in graph.items()}
    state: dict[str, int] = {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in graph[node]:
            assert state.get(nxt) != 1, " -> ".join([*stack, node, nxt])
            if nxt not in state:
                visit(nxt, [*stack, node])
        state[node] = 2

    for node in graph:
        if node not in state:
            visit(node, [])


def xfer(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "xfer", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=120)


def test_help_lists_every_subcommand_in_one_line_each():
    out = xfer("--help")
    assert out.returncode == 0
    for name in ("predict", "compare", "search", "params", "stack"):
        assert any(line.strip().startswith(name + " ") for line in out.stdout.splitlines()), out.stdout


@pytest.mark.parametrize("args, words", [(["frobnicate"], ["unknown command 'frobnicate'", "predict, compare"]),
                                         (["compare", "--colour"], ["--colour", "valid options", "--per-run"]),
                                         (["params", "--colour"], ["--colour", "--check"]),
                                         (["search", "--colour"], ["--colour", "valid options", "--trials"]),
                                         (["stack", "sideways"], ["invalid choice", "up", "down"])])
def test_a_bad_command_line_is_one_line_with_the_valid_choices(args, words):
    out = xfer(*args)
    assert out.returncode == 2 and out.stderr.count("\n") == 1, out.stderr
    assert all(w in out.stderr for w in words), out.stderr


@pytest.mark.parametrize("name, option", [("predict", "--explain"), ("compare", "--per-run"), ("params", "--check"),
                                          ("stack", "--auth"), ("sync", "--list"), ("search", "--timeout")])
def test_each_subcommand_documents_its_options(name, option):
    out = xfer(name, "--help")
    assert out.returncode == 0 and option in out.stdout, out.stdout


def test_the_console_script_is_declared():
    text = (REPO / "pyproject.toml").read_text()
    assert 'xfer = "xfer.cli:main"' in text


@pytest.mark.parametrize("old, new", [("xfer.params", "params"), ("xfer.compare", "compare"),
                                      ("xfer.stack", "stack"), ("stages.predict", "predict")])
def test_old_spellings_still_work_and_name_the_new_command(old, new):
    out = subprocess.run([sys.executable, "-m", old, "--help"], cwd=REPO, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0 and f"`xfer {new}`" in out.stderr, out.stderr


# Code that only records or sets up (MLflow runs, the parent summary, config reading, signals, retries, the quiet
# TensorFlow import, warm starts): a change to it
# must not rerun a stage, so dvc.yaml leaves it out of the deps, and the walk below does not follow its imports.
RECORD_ONLY = {"xfer/track/store.py", "xfer/track/runs.py", "xfer/track/recorder.py", "xfer/track/spool.py",
               "xfer/track/summary.py", "xfer/track/compare.py", "xfer/core/retry.py", "xfer/core/signals.py",
               "xfer/core/args.py", "xfer/core/config.py", "xfer/core/params.py", "xfer/core/quiet.py",
               "xfer/core/warm.py"}


def module_file(root: Path, module: str) -> str | None:
    for candidate in (module.replace(".", "/") + ".py", module.replace(".", "/") + "/__init__.py"):
        if (root / candidate).is_file():
            return candidate
    return None


def code_deps(root: Path, stage_file: str) -> set[str]:
    """The xfer files a stage's outputs depend on: its imports, transitively, less the record-only code."""
    seen, todo = set(), [stage_file]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        if name in RECORD_ONLY:
            continue
        todo += [f for _, m in imported_modules(root / name) if m.startswith("xfer") and (f := module_file(root, m))]
    return {f for f in seen - RECORD_ONLY if f.startswith("xfer/") and not f.endswith("__init__.py")}


def test_each_stage_depends_on_exactly_the_code_it_runs():
    import yaml

    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    for name, stage in stages.items():
        listed = {d for d in stage["deps"] if d.startswith("xfer/")}
        assert f"stages/{name}.py" in stage["deps"], name
        assert listed == code_deps(REPO, f"stages/{name}.py"), name
        assert not any(d.startswith("xfer/stack/") for d in listed), name

"""Find the project, load the composed ``params.yaml`` through Hydra, compose ``conf/`` into it."""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from xfer import XferError
from xfer.core import signals

PARAMS_FILE = "params.yaml"
CONF_DIR = "conf"
# Groups whose files hold one section of params.yaml (``backbone=xception`` swaps ``backbone:``).
SECTION_GROUPS = ("data", "backbone", "head", "finetune", "scratch")


def project_root(start: Path | None = None) -> Path:
    """The nearest directory at or above ``start`` (default: cwd) holding ``dvc.yaml``."""
    here = (start or Path.cwd()).resolve()
    for d in (here, *here.parents):
        if (d / "dvc.yaml").is_file():
            return d
    raise XferError(f"no dvc.yaml found in {here} or its parents; run the stages from the project folder")


def repo_root() -> Path:
    """The user's repository, even inside a DVC temp experiment (.dvc/tmp/exps/...): home of shared state,
    the MLflow database and the download cache."""
    if os.environ.get("DVC_ROOT"):
        return Path(os.environ["DVC_ROOT"]).resolve()
    root = project_root()
    parts = root.parts
    for i in range(len(parts) - 3):  # .../<repo>/.dvc/tmp/exps/<tmpdir>
        if parts[i : i + 3] == (".dvc", "tmp", "exps"):
            return Path(*parts[:i])
    return root


def choices(group: str, root: Path | None = None) -> list[str]:
    """The options of one config group: the yaml files in ``conf/<group>/``."""
    folder = (root or project_root()) / CONF_DIR / group
    return sorted(p.stem for p in folder.glob("*.yaml"))


def _check_choice(group: str, choice: str, root: Path) -> None:
    valid = choices(group, root)
    if choice not in valid:
        raise XferError(f"{group}={choice}: no such option in {CONF_DIR}/{group}/; valid choices: {', '.join(valid)}")


def _check_key(cfg: DictConfig, key: str) -> None:
    """Refuse an override of a key params.yaml does not have, listing the keys that exist there."""
    parts = key.split(".")
    node = cfg
    for i, part in enumerate(parts):
        where = ".".join(parts[:i]) or "the top level"
        if not isinstance(node, DictConfig):
            raise XferError(f"{key}: '{where}' is a value in params.yaml, not a section")
        if part not in node.keys():  # keys() also lists ??? values, which `in` would not
            raise XferError(f"{key}: no such key in params.yaml; valid keys at {where}: "
                            f"{', '.join(str(k) for k in node)} (prefix with + to add a new key)")
        if i < len(parts) - 1:
            node = node[part]


def _one_line(exc: Exception) -> str:
    return " ".join(str(exc).split())


def _compose(config_dir: Path, name: str, overrides: Sequence[str]) -> DictConfig:
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        with initialize_config_dir(str(config_dir), version_base=None):
            cfg = compose(config_name=name, overrides=list(overrides))
        OmegaConf.resolve(cfg)
    except (HydraException, OmegaConfBaseException) as exc:
        raise XferError(f"config: {_one_line(exc)}") from None
    return cfg


def compose_conf(overrides: Sequence[str] = (), root: Path | None = None) -> DictConfig:
    """Compose ``conf/config.yaml`` with Hydra exactly as ``dvc exp run`` does before writing ``params.yaml``."""
    root = root or project_root()
    for ov in overrides:
        key, sep, value = ov.lstrip("+").partition("=")
        if sep and (root / CONF_DIR / key).is_dir():
            _check_choice(key, value, root)
    return _compose(root / CONF_DIR, "config", overrides)


def load_params(overrides: Sequence[str] = (), root: Path | None = None) -> DictConfig:
    """Load ``params.yaml`` through Hydra, applying command-line overrides.

    ``key=value`` overrides change one value (unknown keys are refused); ``group=option`` for a group in
    ``conf/`` (e.g. ``backbone=xception``) replaces that whole section with ``conf/<group>/<option>.yaml``.
    A null ``data.name`` becomes the data's own name (:func:`data_name`).
    """
    return _with_data_name(_load(overrides, root))


def _load(overrides: Sequence[str], root: Path | None) -> DictConfig:
    root = root or project_root()
    params = root / PARAMS_FILE
    if not params.is_file():
        raise XferError(f"{params} not found; compose it with `xfer params` (or `dvc exp run`)")
    base = OmegaConf.load(params)
    rest = []
    for ov in overrides:  # group selections first, so `data=synthetic data.per_class=5` works
        key, sep, value = ov.partition("=")
        if sep and key in SECTION_GROUPS:
            _check_choice(key, value, root)
            base[key] = compose_conf([f"{key}={value}"], root)[key]  # with the option's own defaults list
        else:
            rest.append(ov)
    for ov in rest:
        key, sep, _ = ov.partition("=")
        if sep and not key.startswith(("+", "~")):
            _check_key(base, key)
    if not overrides:  # what DVC runs: params.yaml as it is, without Hydra's start-up (about 0.3 s a stage)
        try:
            OmegaConf.resolve(base)
        except Exception as exc:  # noqa: BLE001 - omegaconf's interpolation errors, as _compose reports them
            raise XferError(f"config: {_one_line(exc)}") from None
        OmegaConf.set_struct(base, True)
        return base
    if len(rest) == len(overrides):
        return _compose(root, "params", rest)
    with tempfile.TemporaryDirectory() as tmp:
        OmegaConf.save(base, Path(tmp) / PARAMS_FILE)
        return _compose(Path(tmp), "params", rest)


ARCHIVE_SUFFIXES = (".tar.gz", ".tar.bz2", ".tar.xz", ".tgz", ".zip", ".tar")
# CSV names that say nothing about the data set: its folder names it instead (Kaggle's dog-breed/labels.csv).
GENERIC_TABLES = ("labels", "label", "annotations", "metadata", "train", "data", "dataset", "images", "index")


def data_name(data: DictConfig) -> str:
    """The data set's name: ``data.name``, else taken from the data itself (the archive's or folder's stem, the
    CSV's stem or, for a generic one such as labels.csv, its folder's name), so two data sets never share the
    MLflow experiment, the dataset names or the registered model."""
    if data.get("name"):
        return str(data.name)
    url = str(data.get("url") or data.get("kind") or "data")
    from urllib.parse import unquote, urlparse

    parsed = urlparse(url)
    path = Path(unquote(parsed.path) if parsed.scheme in ("http", "https", "file") else url).expanduser()
    if path.name in ("", ".", ".."):
        path = path.resolve()
    name = path.name
    if data.get("kind") == "csv":
        stem = Path(name).stem
        return path.parent.name if stem.lower() in GENERIC_TABLES and path.parent.name not in ("", ".") else stem
    for suffix in ARCHIVE_SUFFIXES:
        if name.lower().endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return name


def _with_data_name(cfg: DictConfig) -> DictConfig:
    if "data" in cfg and not cfg.data.get("name"):  # no url yet: the download stage says it is missing
        has_url = OmegaConf.select(cfg, "data.url", default=None) is not None
        cfg.data.name = data_name(cfg.data) if has_url else str(cfg.data.get("kind") or "data")
    return cfg


def require(cfg: DictConfig, *keys: str) -> None:
    """Fail with one line naming the first missing (or ``???``) key."""
    for key in keys:
        if OmegaConf.select(cfg, key, default=None) is None:
            raise XferError(f"params.yaml: key '{key}' is missing or empty; set it in params.yaml or conf/")


def fast_exit(code: int = 0) -> None:
    """End a finished stage process now: flush what it printed and logged, then skip the interpreter's teardown
    (about 1.6 s of CPU with TensorFlow loaded, paid by every stage of every `dvc repro`). Only after the stage's
    work is done: its outputs are renamed into place and its MLflow records sent or spooled; no thread of ours
    is left (the recorder was closed). XFER_FAST_EXIT=0 keeps the normal exit."""
    if os.environ.get("XFER_FAST_EXIT", "1") == "0":
        return
    from xfer.core.warm import flush_and_exit

    flush_and_exit(code)


def run_cli(main: Callable[[DictConfig], None], argv: Sequence[str] | None = None,
            tensorflow: bool = False) -> None:
    """Entry point shared by the stages: load params with overrides, run, turn expected errors into one line.

    SIGTERM and Ctrl-C discard partial outputs and mark the MLflow run KILLED. ``tensorflow``: import it
    quietly (after the params are checked, so a bad override fails fast)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-h", "--help"):
        doc = (sys.modules[main.__module__].__doc__ or "").strip()
        print(f"{doc}\n\nusage: python -m {main.__module__} [key=value ...] [group=option ...]")
        return
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError, MissingMandatoryValue

    signals.install()
    try:
        cfg = load_params(argv)
        if tensorflow:
            from xfer.core.quiet import import_tensorflow

            import_tensorflow()
        main(cfg)
        signals.raise_if_interrupted()  # a signal some library swallowed still ends the stage as interrupted
        if main.__module__ == "__main__":  # a stage process (python -m stages.x), not a caller in-process
            fast_exit()
    except XferError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    except MissingMandatoryValue as exc:
        print(f"error: params.yaml: '{exc.full_key}' must be set (it is ???); pass {exc.full_key}=...",
              file=sys.stderr)
        raise SystemExit(2) from None
    except (ConfigAttributeError, ConfigKeyError) as exc:
        print(f"error: params.yaml: key '{exc.full_key}' is missing; restore it from conf/ "
              "(xfer params) or add it", file=sys.stderr)
        raise SystemExit(2) from None
    except BaseException as exc:
        if isinstance(exc, SystemExit) or not signals.interrupted(exc):
            raise
        term = isinstance(exc, signals.Terminated) or signals.terminated()
        print(f"{'terminated' if term else 'interrupted'}; partial outputs were discarded", file=sys.stderr)
        raise SystemExit(143 if term else 130) from None

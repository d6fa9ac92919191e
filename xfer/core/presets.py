"""Experiment presets written from params: ``conf/experiment/<name>.yaml`` holding the config group options and
the keys in which some params differ from what ``conf/`` composes to, so that ``dvc exp run -S experiment=<name>``
(or ``xfer params experiment=<name>``) gives back exactly those params."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from xfer import XferError
from xfer.core.config import CONF_DIR, compose_conf, project_root


def _nested(flat: dict[str, Any]) -> dict:
    out: dict = {}
    for key, value in flat.items():
        node = out
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return out


def _diff(current: Any, default: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(current, dict) and isinstance(default, dict):
        out = {}
        for key, value in current.items():
            out.update(_diff(value, default.get(key, "\0absent"), f"{prefix}{key}."))
        return out
    return {} if current == default else {prefix.rstrip("."): current}


def _group_options(current: dict, root: Path) -> dict[str, str]:
    """For each section group (data, backbone, ...), the option in conf/ nearest to the current section: the same
    keys, then the fewest differing values (only where it is not the default's)."""
    from xfer.core.config import SECTION_GROUPS, choices

    default = OmegaConf.to_container(compose_conf([], root), resolve=True)
    picked = {}
    for group in SECTION_GROUPS:
        if group not in current or _same_keys(current[group], default.get(group)) and not _diff(
                current[group], default[group]):
            continue
        best = None
        for option in choices(group, root):
            section = OmegaConf.to_container(compose_conf([f"{group}={option}"], root), resolve=True)[group]
            if not _same_keys(current[group], section):
                continue
            score = len(_diff(current[group], section))
            if best is None or score < best[0]:
                best = (score, option)
        if best is not None:
            picked[group] = best[1]
    return picked


def _same_keys(a: Any, b: Any) -> bool:
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same_keys(a[k], b[k]) for k in a)
    return not isinstance(a, dict) and not isinstance(b, dict)


def write_preset(name: str, cfg: DictConfig, values: dict[str, Any], header: str, root: Path | None = None) -> Path:
    """``conf/experiment/<name>.yaml``: the config group options the params were composed from (``override /data:
    archive``, ...) and every params.yaml key that differs from what they compose to (the data, backbone and
    preset) with ``values`` (params.yaml keys) applied; checked to compose back to exactly those params, else not
    kept."""
    from xfer.core.files import atomic_write_text

    root = root or project_root()
    target = root / CONF_DIR / "experiment" / f"{name}.yaml"
    wanted = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    for key, value in values.items():
        OmegaConf.update(wanted, key, value, merge=False)
    wanted_c = OmegaConf.to_container(wanted, resolve=True)
    groups = _group_options(wanted_c, root)
    base = compose_conf([f"{g}={o}" for g, o in groups.items()], root)
    flat = _diff(wanted_c, OmegaConf.to_container(base, resolve=True))
    body = "".join(["defaults:\n", *(f"  - override /{g}: {o}\n" for g, o in groups.items())]) if groups else ""
    body += OmegaConf.to_yaml(OmegaConf.create(_nested(flat))) if flat else ""
    comment = "".join(f"# {line}\n" if line else "#\n" for line in header.splitlines())
    atomic_write_text(target, f"# @package _global_\n{comment}{body}")
    try:
        composed = OmegaConf.to_container(compose_conf([f"experiment={name}"], root), resolve=True)
    except XferError:
        target.unlink()
        raise
    if composed != wanted_c:
        target.unlink()
        raise XferError(f"{target}: would not compose back to the searched params (a section with keys no option "
                        "in conf/ has?); nothing written")
    return target

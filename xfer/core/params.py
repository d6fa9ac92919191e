"""Compose ``conf/`` into ``params.yaml`` (what ``dvc exp run`` does), e.g. before a plain ``dvc repro``.

usage: xfer params [--check] [group=option ...] [key=value ...]

  group=option   pick a config group's option, e.g. experiment=demo, backbone=mobilenet, data=archive
  key=value      set a key, e.g. data.url=/path/to/photos.zip split.train=0.6 head.units=128
  --check        only tell whether params.yaml is what conf/ composes to (exit 2 if not)
"""

from __future__ import annotations

import sys

from omegaconf import OmegaConf

from xfer import XferError
from xfer.core.config import PARAMS_FILE, compose_conf, project_root
from xfer.core.files import atomic_write_text


def composed_yaml(overrides: list[str]) -> str:
    """The text ``dvc exp run`` would write to ``params.yaml`` for these overrides."""
    return OmegaConf.to_yaml(compose_conf(overrides))


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if {"-h", "--help"} & set(argv):
        print(__doc__.strip())
        return 0
    unknown = [a for a in argv if a.startswith("-") and a != "--check"]
    if unknown:
        print(f"xfer params: error: unknown option {unknown[0]}; valid options: --check, --help "
              "(the rest are Hydra overrides: group=option key=value)", file=sys.stderr)
        return 2
    check = "--check" in argv
    overrides = [a for a in argv if a != "--check"]
    try:
        text = composed_yaml(overrides)
        target = project_root() / PARAMS_FILE
        if check:
            if not target.is_file() or target.read_text() != text:
                raise XferError(f"{target} differs from what conf/ composes to; run `xfer params`")
            print(f"{target} is up to date with conf/")
            return 0
        atomic_write_text(target, text)
    except XferError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {target}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

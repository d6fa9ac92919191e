"""Argument parsing for the ``xfer`` subcommands: argparse whose errors are one line naming the valid choices."""

from __future__ import annotations

import argparse
import sys
from typing import NoReturn


class Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` that reports a bad command line in one line (``error: ...; valid options: ...``) and
    exits 2, instead of argparse's usage block."""

    def error(self, message: str) -> NoReturn:
        if message.startswith("unrecognized arguments"):
            message += f"; valid options: {', '.join(self.option_names())}"
        print(f"{self.prog}: error: {message} (see {self.prog} --help)", file=sys.stderr)
        raise SystemExit(2)

    def option_names(self) -> list[str]:
        """The long option strings this parser accepts (``--help`` included)."""
        return [max(a.option_strings, key=len) for a in self._actions if a.option_strings]

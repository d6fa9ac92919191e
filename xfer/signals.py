"""Ctrl-C and SIGTERM in a stage: raised as KeyboardInterrupt (SIGTERM as its subclass ``Terminated``) and also
remembered, because a library may swallow or convert an exception raised inside it (TensorFlow does so while it
traces a function). Atomic writes check the memory before committing an output, so a signal always ends the
stage with its partial outputs discarded, never with a completed output."""

from __future__ import annotations

import signal

received: list[int] = []  # signals seen by this process


class Terminated(KeyboardInterrupt):
    """SIGTERM (``kill``, ``dvc queue kill``, a CI timeout), handled exactly like Ctrl-C."""


def _on_signal(signum, frame) -> None:
    received.append(signum)
    raise Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()


def install() -> None:
    """Handle SIGTERM, and Ctrl-C unless this process was started with SIGINT ignored."""
    signal.signal(signal.SIGTERM, _on_signal)
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, _on_signal)


def interrupted(exc: BaseException | None = None) -> bool:
    """True if ``exc`` is, or (any exception) stems from, Ctrl-C or SIGTERM received by this process."""
    return isinstance(exc, KeyboardInterrupt) or bool(received)


def terminated() -> bool:
    """Whether the signal received was SIGTERM (exit 143) rather than Ctrl-C (exit 130)."""
    return signal.SIGTERM in received


def raise_if_interrupted() -> None:
    """Raise the received signal again (before committing an output) if a library swallowed it."""
    if received:
        raise Terminated() if terminated() else KeyboardInterrupt()

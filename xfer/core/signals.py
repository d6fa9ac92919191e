"""Ctrl-C and SIGTERM in a stage: raised as KeyboardInterrupt (SIGTERM as its subclass ``Terminated``) and also
remembered, because a library may swallow or convert an exception raised inside it (TensorFlow does so while it
traces a function, and its C++ code prints a traceback when one lands inside a Python callback it runs). So a
signal that arrives while TensorFlow's code is on the stack is only remembered, then raised at the next step
boundary (training's progress bar, featurize's batch loop) or, failing that, after ``FORCE_AFTER_S``. Atomic
writes check the memory before committing an output, so a signal always ends the stage with its partial outputs
discarded, never with a completed output."""

from __future__ import annotations

import os
import signal
import threading

received: list[int] = []  # signals seen by this process
FORCE_AFTER_S = 2.0  # a deferred signal is raised anyway after this long without a step boundary
_DEFER_IN = (f"{os.sep}tensorflow{os.sep}", f"{os.sep}tf_keras{os.sep}")
_timer: threading.Timer | None = None


class Terminated(KeyboardInterrupt):
    """SIGTERM (``kill``, ``dvc queue kill``, a CI timeout), handled exactly like Ctrl-C."""


def _in_tensorflow(frame) -> bool:
    while frame is not None:
        if any(part in frame.f_code.co_filename for part in _DEFER_IN):
            return True
        frame = frame.f_back
    return False


def _on_signal(signum, frame) -> None:
    global _timer
    received.append(signum)
    if len(received) == 1 and _in_tensorflow(frame):
        _timer = threading.Timer(FORCE_AFTER_S, os.kill, (os.getpid(), signum))
        _timer.daemon = True
        _timer.start()
        return
    _raise()


def _raise() -> None:
    if _timer is not None:
        _timer.cancel()
    raise Terminated() if terminated() else KeyboardInterrupt()


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


def handled() -> None:
    """Forget the signals received: the caller has stopped its work for them and still writes what it kept (the
    search's best trial so far), which the atomic writes would otherwise refuse."""
    if _timer is not None:
        _timer.cancel()
    received.clear()


def raise_if_interrupted() -> None:
    """Raise a received signal (deferred, or swallowed by a library) before the next step or output commit."""
    if received:
        _raise()

"""Ctrl-C held over code where a KeyboardInterrupt would be lost, then raised."""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Iterator


@contextlib.contextmanager
def interrupts_held() -> Iterator[None]:
    """Ctrl-C (SIGINT) that comes in this block is recorded, not raised, and raised as
    ``KeyboardInterrupt`` once the block ends (an error of the block's own goes first).

    Python raises KeyboardInterrupt wherever the main thread happens to be, and some places drop
    it: numba and llvmlite run Python code in ``__del__`` methods and C callbacks while they
    compile or load a build, where an exception is printed and ignored (the run then went on as
    if Ctrl-C had not come); a fork runs at-fork handlers, where it is ignored too and leaves the
    logging lock held (the next fork deadlocks). Outside the main thread, or where SIGINT is
    ignored (a background job) or handled by code outside Python, this does nothing."""
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGINT) in (signal.SIG_IGN, None):
        yield
        return
    interrupted: list[bool] = []
    previous = signal.signal(signal.SIGINT, lambda *_: interrupted.append(True))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)  # runs the handler of a signal still pending first
    if interrupted:
        raise KeyboardInterrupt

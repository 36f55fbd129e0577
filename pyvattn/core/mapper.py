"""BackgroundMapper: ``step_async``'s one worker thread."""

from __future__ import annotations

import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable


class BackgroundMapper:
    """Runs one mapping job at a time on a thread of its own, started on first use.

    ``wait()`` blocks (no polling) until the job submitted last is done and re-raises its error;
    every call into the cache waits first, so a job never overlaps anything else the cache does.
    A wait interrupted by ``KeyboardInterrupt`` leaves the job pending, to be waited for again.
    """

    def __init__(self):
        self._executor: ThreadPoolExecutor | None = None
        self._pending: Future | None = None
        self._ident: int | None = None  # the worker thread, once started

    def submit(self, fn: Callable, *args) -> None:
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pyvattn-map")
        self._pending = self._executor.submit(self._run, fn, *args)

    def _run(self, fn: Callable, *args) -> None:
        self._ident = threading.get_ident()
        fn(*args)

    def wait(self) -> None:
        pending = self._pending
        if pending is None:
            return
        try:
            pending.result()
        finally:
            if pending.done():  # not if the wait itself was interrupted
                self._pending = None

    def on_worker(self) -> bool:
        """Whether the calling thread is the worker (a cache dropped while its job ran is finalised
        there: the job is over, and the thread cannot wait for itself)."""
        return threading.get_ident() == self._ident

    def close(self) -> None:
        """Wait for the job in flight (its error is dropped: the cache is going away) and stop the
        thread. If the wait is interrupted, nothing is stopped."""
        on_worker = self.on_worker()
        if self._pending is not None and not on_worker:
            self._pending.exception()
        self._pending = None
        if self._executor is not None:
            self._executor.shutdown(wait=not on_worker)
            self._executor = None

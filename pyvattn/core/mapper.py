"""BackgroundMapper: ``step_async``'s one worker thread."""

from __future__ import annotations

import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable


class BackgroundMapper:
    """Runs one mapping job at a time on a thread of its own, started on first use.

    ``wait()`` blocks (no polling) until the job submitted last is done; every call into the
    cache waits first, so a job never overlaps anything else the cache does. A job's error goes to
    the thread that submitted it, at its next call (``wait`` raises it there): another thread's
    call must not swallow it, or the submitter would go on as if its pages were mapped. A wait
    interrupted by ``KeyboardInterrupt`` leaves the job pending, to be waited for again.
    """

    def __init__(self):
        self._executor: ThreadPoolExecutor | None = None
        self._pending: tuple[Future, int] | None = None  # the job, and who submitted it
        self._errors: dict[int, BaseException] = {}  # failed jobs' errors, by submitting thread
        self._ident: int | None = None  # the worker thread, once started

    @property
    def idle(self) -> bool:
        """Nothing to wait for and no error to deliver (the hot path checks this first)."""
        return self._pending is None and not self._errors

    def submit(self, fn: Callable, *args) -> None:
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pyvattn-map")
        self._pending = (self._executor.submit(self._run, fn, *args), threading.get_ident())

    def _run(self, fn: Callable, *args) -> None:
        self._ident = threading.get_ident()
        fn(*args)

    def wait(self) -> None:
        if self._pending is not None:
            job, submitter = self._pending
            error = job.exception()  # an interrupted wait leaves the job pending
            self._pending = None
            if error is not None:
                self._errors[submitter] = error
        error = self._errors.pop(threading.get_ident(), None)
        if error is not None:
            raise error

    def on_worker(self) -> bool:
        """Whether the calling thread is the worker (a cache dropped while its job ran is finalised
        there: the job is over, and the thread cannot wait for itself)."""
        return threading.get_ident() == self._ident

    def close(self) -> None:
        """Wait for the job in flight (errors are dropped: the cache is going away) and stop the
        thread. If the wait is interrupted, nothing is stopped."""
        on_worker = self.on_worker()
        if self._pending is not None and not on_worker:
            self._pending[0].exception()
        self._pending = None
        self._errors.clear()
        if self._executor is not None:
            self._executor.shutdown(wait=not on_worker)
            self._executor = None

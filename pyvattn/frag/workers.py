"""Independent simulations in worker processes under one progress bar, stoppable with Ctrl-C."""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Callable, Hashable

_progress_queue = None  # in a worker: where its runs report finished requests
_shared: tuple = ()  # in a worker: the arguments every call starts with


def run_all(calls: dict[Hashable, tuple[Callable, tuple]], jobs: int, progress: Callable[[int], None],
            shared: tuple = ()) -> dict:
    """``{key: fn(*shared, *args, progress=...)}`` for every ``key: (fn, args)`` in ``calls``, in
    ``jobs`` worker processes (1: here, one after another); ``progress(k)`` as runs report ``k``
    finished requests. Functions and arguments must pickle. ``shared`` (the trace: tens of MiB)
    goes to each worker once, when it starts, so that tasks stay small: a task larger than a pipe
    holds blocks the pool's feeder thread, and stopping the pool then waits for it forever. The
    first error (KeyboardInterrupt included) stops every worker at once and is raised here;
    workers ignore Ctrl-C themselves, so that a terminal's interrupt reaches only this process,
    which stops them."""
    if jobs == 1:
        return {key: fn(*shared, *args, progress=progress) for key, (fn, args) in calls.items()}
    import multiprocessing

    context = multiprocessing.get_context()
    queue = context.Queue()
    with _interrupts_deferred() as interrupted:
        pool = context.Pool(jobs, initializer=_init_worker, initargs=(queue, shared))
    with pool:  # exit: terminate()
        if interrupted:
            raise KeyboardInterrupt
        pending = {key: pool.apply_async(_call, (fn, args)) for key, (fn, args) in calls.items()}
        while True:
            while not queue.empty():
                progress(queue.get())
            for result in pending.values():
                if result.ready() and not result.successful():
                    result.get()  # raises its error; leaving the block stops the other workers
            running = [r for r in pending.values() if not r.ready()]
            if not running:
                break
            running[0].wait(0.2)
        return {key: result.get() for key, result in pending.items()}


@contextlib.contextmanager
def _interrupts_deferred():
    """Ctrl-C is recorded, not raised, in this block (in the main thread): starting a pool forks,
    and a KeyboardInterrupt raised inside the fork handlers is ignored there while it leaves the
    logging lock held, so the interrupt is lost and the next fork (a worker replaced) deadlocks.
    Yields a list that holds True if Ctrl-C came meanwhile."""
    interrupted: list[bool] = []
    if threading.current_thread() is not threading.main_thread():
        yield interrupted
        return
    previous = signal.signal(signal.SIGINT, lambda *_: interrupted.append(True))
    try:
        yield interrupted
    finally:
        signal.signal(signal.SIGINT, previous)


def _init_worker(queue, shared: tuple) -> None:
    global _progress_queue, _shared
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _progress_queue, _shared = queue, shared


def _call(fn: Callable, args: tuple):
    return fn(*_shared, *args, progress=_progress_queue.put)

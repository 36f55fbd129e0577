"""Independent simulations in worker processes under one progress bar, stoppable with Ctrl-C."""

from __future__ import annotations

import contextlib
import signal
from typing import Callable, Hashable

from .interrupts import interrupts_held

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
    with contextlib.ExitStack() as stack:
        with interrupts_held():  # Ctrl-C while the workers fork: raised after, and the stack stops them
            pool = stack.enter_context(context.Pool(jobs, initializer=_init_worker, initargs=(queue, shared)))
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


def _init_worker(queue, shared: tuple) -> None:
    global _progress_queue, _shared
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _progress_queue, _shared = queue, shared


def _call(fn: Callable, args: tuple):
    return fn(*_shared, *args, progress=_progress_queue.put)

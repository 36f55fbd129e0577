"""Ctrl-C stops a long frag run at once: exit 130, one line, no traceback, no worker left behind.

A terminal sends SIGINT to the whole process group; ``kill -INT`` to the main process alone. Both
once hung: the pool waited for its workers to finish every remaining scheme. Ctrl-C right after
the progress bar appeared was lost: numba, loading its build, runs llvmlite's ``__del__`` methods
and C callbacks, where Python prints a KeyboardInterrupt and drops it (the run went on).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from pyvattn.frag import compiled, simulate
from pyvattn.frag.interrupts import interrupts_held
from pyvattn.frag.workers import run_all


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def _wait_for_progress(proc: subprocess.Popen, started: bool = True, timeout: float = 120) -> bytes:
    """stderr until the progress bar shows requests finished (the run is under way), or with
    ``started=False`` until the bar appears (the workers are being started)."""
    seen, deadline = b"", time.monotonic() + timeout
    os.set_blocking(proc.stderr.fileno(), False)
    while time.monotonic() < deadline:
        chunk = proc.stderr.read() or b""
        seen += chunk
        done = re.findall(rb"\| *([0-9.]+)k?M?/", seen)
        if done and (not started or float(done[-1]) > 0):
            return seen
        assert proc.poll() is None, seen.decode(errors="replace")
        time.sleep(0.1)
    raise AssertionError(f"no progress within {timeout} s: {seen[-500:]!r}")


def _hashed_trace(path, n: int = 60_000) -> str:
    """A Mooncake-format trace long enough to be interrupted mid-run (the shipped sample of 2,000
    requests can finish before the signal): prompts of 4 blocks, the first shared by a family."""
    with open(path, "w") as f:
        for i in range(n):
            family = i % 50
            f.write(json.dumps({"timestamp": i, "input_length": 2000, "output_length": 100 + i % 300,
                                "hash_ids": [family, 1000 + 3 * i, 1001 + 3 * i, 1002 + 3 * i]}) + "\n")
    return str(path)


@pytest.mark.parametrize("target, mode, when", [
    ("group", "schemes", "mid-run"), ("main process", "schemes", "mid-run"),
    ("group", "prefix-sharing", "mid-run"), ("main process", "prefix-sharing", "mid-run"),
    # while the workers start: an interrupt inside the fork handlers was lost, and the pool hung
    ("group", "prefix-sharing", "at start"), ("main process", "schemes", "at start")])
def test_ctrl_c_stops_the_run_and_its_workers(tmp_path, target, mode, when):
    run = ["--trace", "synthetic:1000000"] if mode == "schemes" else \
        ["--trace", _hashed_trace(tmp_path / "hashed.jsonl"), "--prefix-sharing"]
    cmd = [sys.executable, "-m", "pyvattn", "frag", *run, "--jobs", "2", "--out", str(tmp_path), "--no-plots"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        _wait_for_progress(proc, started=when == "mid-run")
        if target == "group":
            os.killpg(proc.pid, signal.SIGINT)
        else:
            os.kill(proc.pid, signal.SIGINT)
        start = time.monotonic()
        rc = proc.wait(timeout=30)
        took = time.monotonic() - start
        err = proc.stderr.read().decode(errors="replace")
        assert rc == 130, err[-2000:]
        assert "interrupted" in err and "Traceback" not in err, err[-2000:]
        assert took < 10
        deadline = time.monotonic() + 5
        while _group_alive(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _group_alive(proc.pid), "a worker process outlived the run"
    finally:
        if _group_alive(proc.pid):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _bytecode():
    for _ in range(100):  # Python runs a signal's handler at a loop's back edge, among other places
        pass


class _CtrlCWhenCollected:
    """Ctrl-C that lands in a ``__del__``, as in llvmlite's while numba loads its build."""

    def __del__(self):
        signal.raise_signal(signal.SIGINT)
        _bytecode()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_ctrl_c_in_a_del_is_dropped_unless_held():
    _CtrlCWhenCollected()  # the hazard: the KeyboardInterrupt is printed and dropped
    reached = False
    with pytest.raises(KeyboardInterrupt):
        with interrupts_held():
            _CtrlCWhenCollected()
            reached = True  # the block runs to its end
    assert reached and signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_interrupts_held_lets_the_blocks_own_error_through_and_respects_an_ignored_ctrl_c():
    with pytest.raises(ValueError, match="its own"):
        with interrupts_held():
            signal.raise_signal(signal.SIGINT)
            _bytecode()
            raise ValueError("its own")
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # a background job: Ctrl-C stays ignored
    try:
        with interrupts_held():
            signal.raise_signal(signal.SIGINT)
            _bytecode()
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)


def test_warm_raises_ctrl_c_that_came_while_numba_loaded(monkeypatch):
    monkeypatch.setattr(simulate, "serve", lambda *args: _CtrlCWhenCollected() and None)
    with pytest.raises(KeyboardInterrupt):
        compiled.warm()


_ctrl_c_at_fork = False


def _after_fork_in_parent():
    if _ctrl_c_at_fork:
        signal.raise_signal(signal.SIGINT)  # lands in the at-fork handlers, where it is dropped
        _bytecode()


os.register_at_fork(after_in_parent=_after_fork_in_parent)  # for the process; acts only in the test below


def _nap(seconds, progress):
    time.sleep(seconds)
    return seconds


def test_run_all_raises_ctrl_c_that_came_while_its_workers_forked():
    global _ctrl_c_at_fork
    import multiprocessing

    _ctrl_c_at_fork = True
    try:
        with pytest.raises(KeyboardInterrupt):
            run_all({i: (_nap, (30,)) for i in range(2)}, 2, lambda k: None)
    finally:
        _ctrl_c_at_fork = False
    deadline = time.monotonic() + 10
    while multiprocessing.active_children() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not multiprocessing.active_children(), "a worker outlived the interrupted run"

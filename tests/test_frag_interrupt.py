"""Ctrl-C stops a long frag run at once: exit 130, one line, no traceback, no worker left behind.

A terminal sends SIGINT to the whole process group; ``kill -INT`` to the main process alone. Both
once hung: the pool waited for its workers to finish every remaining scheme.
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

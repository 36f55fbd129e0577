"""The command line as a user runs it."""

from __future__ import annotations

import json
import subprocess
import sys


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pyvattn", *args], capture_output=True, text=True,
                          timeout=300)


def test_info_says_which_backend_auto_picks_and_why():
    r = run("info", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    assert "picks host" in r.stdout and "64 KiB" in r.stdout
    facts = json.loads(run("info", "--device", "cpu", "--json").stdout)
    assert facts["auto"]["backend"] == "host"
    names = {row["backend"]: row for row in facts["backends"]}
    assert set(names) == {"host", "cuda-vmm", "uvm64k"}
    assert names["host"]["available"] is True
    for gpu in ("cuda-vmm", "uvm64k"):  # no GPU in CI: unavailable, with a reason
        if not names[gpu]["available"]:
            assert names[gpu]["reason"]


def test_demo_runs_on_a_trace_and_checks_its_data():
    r = run("demo", "--requests", "6", "--layers", "2", "--max-batch", "4", "--budget", "256MiB")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "all K/V values read back as written" in r.stdout
    assert "reserved" in r.stdout and "mapped" in r.stdout

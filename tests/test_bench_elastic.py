"""scripts/bench_elastic.py: a small run end to end (its JSON says what sleep released), and bad
arguments exit 2 naming the flag, without a traceback."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_elastic.py"


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=300)


def test_a_small_host_run_writes_the_table_and_json(tmp_path):
    out = tmp_path / "elastic.json"
    r = run("--layers", "1", "--host-size", "32MiB", "--keep", "1", "--repeat", "1",
            "--backends", "host", "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert "| host" in r.stdout
    rows = json.loads(out.read_text())["results"]
    assert [row["page_size"] for row in rows] == ["64KiB", "2MiB"]
    for row in rows:
        assert row["bytes"] == 32 << 20 and row["requests"] == 2 and row["kept_bytes"] == 16 << 20
        assert row["sleep_ms"]["n"] == row["wake_keep_ms"]["n"] == 1


@pytest.mark.parametrize("args, flag", [(["--backends", "tpu"], "--backends"),
                                        (["--host-size", "1KiB"], "--host-size")])
def test_bad_arguments_exit_2_naming_the_flag(args, flag):
    r = run(*args, "--out", "/dev/null")
    assert r.returncode == 2 and flag in r.stderr and "Traceback" not in r.stderr

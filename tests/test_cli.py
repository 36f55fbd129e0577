"""The command line as a user runs it: help, bad arguments, info, and the demo."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

from pyvattn import KVCache
from pyvattn.__main__ import main
from pyvattn.demo import MemorySplit


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


# --- help ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("command", [[], ["demo"], ["info"]], ids=["top", "demo", "info"])
def test_help_answers_without_importing_torch(command):
    """--help builds the parsers only: torch (seconds to import) stays out of sys.modules."""
    code = ("import sys\nfrom pyvattn.__main__ import main\n"
            f"try:\n    main({[*command, '--help']!r})\nexcept SystemExit as exc:\n    assert exc.code == 0\n"
            "print('torch imported:', 'torch' in sys.modules)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[-1] == "torch imported: False"
    assert "usage: python -m pyvattn" in r.stdout


def test_help_is_plain_text_with_defaults_and_valid_names():
    top = run("--help").stdout
    assert all(cmd in top for cmd in ("info", "demo", "frag"))
    demo = " ".join(run("demo", "--help").stdout.split())  # as one line: help wraps at any space
    for text in (top, demo):
        assert "``" not in text and ":func:" not in text
    for name in ("arxiv", "sharegpt", "azure-conv", "mooncake", "llama-3-8b", "llama-3-70b", "cuda-vmm"):
        assert name in demo
    for default in ("(default: 1GiB)", "(default: 24)", "(default: arxiv)", "(default: llama-3-8b)"):
        assert default in demo


def test_backend_choices_are_the_backends():
    from pyvattn import backend_names
    from pyvattn.__main__ import BACKENDS

    assert set(BACKENDS) == {"auto", *backend_names()}


# --- bad arguments -------------------------------------------------------------------------------
BAD_DEMO_ARGUMENTS = [
    ["--budget", "lots"], ["--budget", "-1GiB"], ["--budget", "0"], ["--budget", "1MiB"],
    ["--requests", "0"], ["--requests", "many"], ["--layers", "0"], ["--max-batch", "-2"],
    ["--max-seq-len", "1.5"], ["--trace", "no-such-trace"], ["--model", "gpt-5"], ["--model", "1,2"],
    ["--page-size", "0"], ["--page-size", "1000"], ["--device", "gpu"], ["--backend", "nope"],
    ["--backend", "cuda-vmm"], ["--no-such-option"],
]


@pytest.mark.parametrize("args", BAD_DEMO_ARGUMENTS, ids=" ".join)
def test_demo_bad_argument_is_one_line_and_exit_2(args, capsys):
    try:
        code = main(["demo", "--requests", "3", "--layers", "1", *args])
    except SystemExit as exc:  # argparse's own exit
        code = exc.code
    out, err = capsys.readouterr()
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert re.match(r"python -m pyvattn( demo)?: error: ", lines[0]), lines[0]
    assert "Traceback" not in err


@pytest.mark.parametrize("budget", ["0", "1MiB"])
def test_budget_too_small_for_one_request_is_an_error_and_the_suggested_budget_works(budget, capsys):
    args = ["demo", "--requests", "3", "--layers", "1", "--max-seq-len", "4096"]
    assert main([*args, "--budget", budget]) == 2
    err = capsys.readouterr().err
    assert "too small for one request" in err
    suggested = re.search(r"pass --budget (\S+) or more", err).group(1)
    assert main([*args, "--budget", suggested]) == 0
    assert "all K/V values read back as written" in capsys.readouterr().out


# --- the demo ------------------------------------------------------------------------------------
def test_demo_explains_where_memory_goes_and_why_requests_wait():
    r = run("demo", "--requests", "6", "--layers", "2", "--max-batch", "4", "--budget", "256MiB")
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout
    for legend in ("in use", "frag", "retained", "deferred reclaim", "pool", "static", "waits for"):
        assert legend in out
    assert "all K/V values read back as written" in out
    assert re.search(r"static reservation \(\S+ \S+ per request\) fits \d+", out)
    assert " memory " in out  # the budget held a request back
    slots = run("demo", "--requests", "6", "--layers", "1", "--max-batch", "2", "--budget", "1GiB")
    assert slots.returncode == 0, slots.stderr
    assert " a slot " in slots.stdout  # both slots busy held a request back


def test_demo_preempts_when_decode_growth_does_not_fit(tmp_path, capsys):
    trace = tmp_path / "trace.csv"  # 3 short prompts that grow to 632 tokens: 2.5 MiB each in one layer
    trace.write_text("prompt_tokens,output_tokens\n" + "32,600\n" * 3)
    code = main(["demo", "--trace", str(trace), "--layers", "1", "--budget", "4MiB", "--page-size", "64KiB"])
    out = capsys.readouterr().out
    assert code == 0
    assert "preempted" in out and "preemptions: 0" not in out
    assert "all K/V values read back as written" in out


def test_memory_split_accounts_for_every_physical_byte():
    # 2 layers x K,V = 4 regions; a token is 2 heads x 64 x 4 bytes = 512 B, 8 tokens per 4 KiB page
    with KVCache(2, 2, 64, max_batch_size=4, max_seq_len=1024, dtype=torch.float32, device="cpu",
                 page_size="4KiB", memory_budget="1MiB") as cache:
        a, b = cache.alloc_slot(), cache.alloc_slot()
        cache.step({a: 20, b: 3})  # a: 3 pages per region, b: 1
        cache.free_slot(b)  # b's page stays mapped for the next request (deferred reclaim)
        m = MemorySplit.of(cache)
        assert m.in_use == 20 * 512 * 4
        assert m.fragmentation == (3 * 4096 - 20 * 512) * 4  # a's last, partly filled page
        assert m.retained == 4096 * 4
        assert m.in_use + m.fragmentation + m.retained + m.pool == m.physical == cache.stats()["physical_bytes"]
        cache.free_slot(a)
        c = cache.alloc_slot(2)  # takes b's slot, whose one page covers 2 tokens
        d = cache.alloc_slot(2)  # takes a's slot: 2 of its 3 pages are more than 2 tokens need
        cache.step({c: 2, d: 2})
        m = MemorySplit.of(cache)
        assert m.in_use == 2 * 2 * 512 * 4
        assert m.fragmentation == 2 * (4096 - 2 * 512) * 4
        assert m.retained == 2 * 4096 * 4  # d's slot beyond its length: reclaimable at once
        assert m.in_use + m.fragmentation + m.retained + m.pool == m.physical



def test_demo_rows_arrive_while_it_runs_and_ctrl_c_says_so_without_a_traceback():
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # stdout a pipe, buffered
    proc = subprocess.Popen([sys.executable, "-m", "pyvattn", "demo", "--layers", "1"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    for line in proc.stdout:  # the first row of the table, while the demo still runs
        if re.match(r"\s+0\s.* admitted$", line):
            break
    assert proc.poll() is None, "the demo's rows came only when it ended"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert err.strip().splitlines() == ["python -m pyvattn demo: interrupted"]


def test_serve_ctrl_c_says_so_without_a_traceback():
    proc = subprocess.Popen([sys.executable, "-m", "pyvattn", "serve", "--requests", "400", "--rate", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:  # the engine has started: its first line names the model
        if "requests from" in line:
            break
    time.sleep(1)
    assert proc.poll() is None, "serve ended before it could be interrupted"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert err.strip().splitlines()[-1] == "python -m pyvattn serve: interrupted" and "Traceback" not in err

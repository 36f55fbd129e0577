"""`python -m pyvattn top` as a user runs it: the ledger's accounts in human sizes, one frame with
--once, frames until Ctrl-C (exit 130, quietly), and bad names as one-line errors (exit 2)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from pyvattn import SharedBudget
from pyvattn.budget.shared import ledger_path
from pyvattn.budget.top import render


@pytest.fixture(autouse=True)
def budget_dir(tmp_path, monkeypatch):
    """Ledgers of these tests in their own directory (inherited by `top` run as a subprocess)."""
    monkeypatch.setenv("PYVATTN_BUDGET_DIR", str(tmp_path))
    return tmp_path


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pyvattn", "top", *args], capture_output=True, text=True,
                          timeout=120)


def test_once_shows_each_account_and_the_budget_in_human_sizes():
    with SharedBudget("gpu0", "8GiB") as budget, SharedBudget("spare") as spare:
        llama = budget.open_account("llama-3-8b")
        llama.try_charge(3 << 30)
        llama.report(used=(2 << 30) + (1 << 29), retained=1 << 29)
        budget.open_account("qwen").try_charge(1 << 30)
        spare.open_account("scratch").try_charge(64 << 10)
        r = run("--once")
        assert r.returncode == 0 and r.stderr == "", r.stderr
        lines = r.stdout.splitlines()
        assert lines[0].startswith("budget gpu0: limit 8 GiB, charged 4 GiB, headroom 4 GiB")
        assert lines[1].split() == ["PID", "ACCOUNT", "USED", "RETAINED", "CHARGED"]
        assert lines[2].split() == [str(os.getpid()), "llama-3-8b", "2.5", "GiB", "512", "MiB", "3", "GiB"]
        assert lines[3].split() == [str(os.getpid()), "qwen", "0", "B", "0", "B", "1", "GiB"]
        assert "budget spare: limit none, charged 64 KiB, headroom unlimited" in r.stdout
        only = run("--once", "--name", "spare")
        assert only.returncode == 0 and "gpu0" not in only.stdout and "scratch" in only.stdout


def exit_holding(name: str, nbytes: int) -> None:
    """A process that charges ``nbytes`` to the budget ``name`` and exits without closing."""
    child = subprocess.run([sys.executable, "-c", "import os\nfrom pyvattn import SharedBudget\n"
                            f"SharedBudget({name!r}).open_account('gone').try_charge({nbytes})\nos._exit(0)"],
                           timeout=120)
    assert child.returncode == 0


def test_a_process_that_exited_is_marked_and_its_share_comes_back_when_top_opens_the_ledger():
    with SharedBudget("gpu0", "1GiB") as budget:
        exit_holding("gpu0", 1 << 20)
        assert budget.used() == 1 << 20
        [row] = [line for line in render(budget).splitlines() if "gone" in line]
        assert row.split()[1:] == ["gone", "(exited)", "0", "B", "0", "B", "1", "MiB"]
        r = run("--once", "--name", "gpu0")
        assert r.returncode == 0 and "gone" not in r.stdout and budget.used() == 0


def test_no_budgets_is_said_plainly(budget_dir):
    r = run("--once")
    assert r.returncode == 0 and r.stdout.strip() == f"no pyvattn budgets in {budget_dir}"


@pytest.mark.parametrize("args, message", [
    (["--name", "nope"], "error: no budget named 'nope' ("),
    (["--name", "a/b"], "error: name='a/b' must be"),
    (["--interval", "0"], "error: argument --interval: '0' must be more than 0 seconds"),
    (["--interval", "soon"], "error: argument --interval: 'soon' is not a number of seconds"),
    (["--bogus"], "error: unrecognized arguments: --bogus"),
])
def test_bad_arguments_are_one_line_and_exit_2(args, message):
    with SharedBudget("real"):
        r = run("--once", *args)
    assert r.returncode == 2 and r.stdout == ""
    assert len(r.stderr.splitlines()) == 1 and r.stderr.startswith("python -m pyvattn") and message in r.stderr
    if args[:2] == ["--name", "nope"]:
        assert "budgets here: real" in r.stderr


def test_a_damaged_ledger_is_an_error_by_name_and_a_line_among_the_others():
    ledger_path("broken").write_bytes(b"x" * 100)
    r = run("--once", "--name", "broken")
    assert r.returncode == 2 and "is not a pyvattn budget ledger" in r.stderr and len(r.stderr.splitlines()) == 1
    with SharedBudget("fine"):
        r = run("--once")
    assert r.returncode == 0
    assert "budget broken: " in r.stdout and "is not a pyvattn budget ledger" in r.stdout and "budget fine:" in r.stdout


def test_frames_repeat_until_ctrl_c_which_exits_130_quietly():
    with SharedBudget("gpu0", "1GiB") as budget:
        account = budget.open_account("grower")
        proc = subprocess.Popen([sys.executable, "-m", "pyvattn", "top", "--interval", "0.05"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            seen = []
            for line in proc.stdout:
                seen.append(line)
                if line.startswith("budget gpu0"):
                    account.try_charge(1 << 20)  # the next frames show it
                if sum(line.startswith("budget gpu0") for line in seen) >= 3:
                    break
            time.sleep(0.1)
            proc.send_signal(signal.SIGINT)
            out, err = proc.communicate(timeout=60)
        finally:
            proc.kill()
            proc.wait()
        assert proc.returncode == 130 and err == ""
        assert "charged 0 B" in seen[0] and any("charged 1 MiB" in line or "charged 2 MiB" in line for line in seen)


def test_help_answers_without_importing_torch():
    code = ("import sys\nfrom pyvattn.__main__ import main\n"
            "try:\n    main(['top', '--help'])\nexcept SystemExit as exc:\n    assert exc.code == 0\n"
            "print('torch imported:', 'torch' in sys.modules)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[-1] == "torch imported: False" and "--interval S" in r.stdout

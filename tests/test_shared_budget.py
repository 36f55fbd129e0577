"""SharedBudget across processes: concurrent charges never pass the limit, a SIGKILLed process's
share comes back, a limit changed while they run holds at once, forked children, and ledger
files that are not what they should be."""

from __future__ import annotations

import gc
import multiprocessing as mp
import os
import random
import signal
import subprocess
import sys
import time
import uuid

import numpy as np
import pytest

from pyvattn import BudgetLimitConflict, LedgerCorrupt, LedgerNotFound, SharedBudget
from pyvattn.budget.ledger import FILE_BYTES, HEADER, SLOT, VERSION
from pyvattn.budget.shared import ledger_path

UNIT = 4096
FORK = mp.get_context("fork")


@pytest.fixture
def ledger_name():
    name = f"test-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    yield name
    SharedBudget.remove(name)


def wait_until(predicate, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)


# --- workers (top level, so that spawn can import them) ------------------------------------------
def stress_worker(name: str, seed: int, ops: int, results, done) -> None:
    """Charge and release at random; after each charge read the total, which must be in the limit."""
    budget = SharedBudget(name)
    account = budget.open_account(f"stress{seed}")
    rng, held, over, refused = random.Random(seed), 0, 0, 0
    for _ in range(ops):
        if held and rng.random() < 0.45:
            n = rng.randint(1, held // UNIT) * UNIT
            account.release(n)
            held -= n
        elif account.try_charge(n := rng.randint(1, 5) * UNIT):
            held += n
            over += budget.used() > budget.limit
        else:
            refused += 1
    results.put((os.getpid(), held, over, refused))
    done.wait(60)
    budget.close()


def fill_worker(name: str, results, done) -> None:
    budget = SharedBudget(name)
    account = budget.open_account("fill")
    got = 0
    while account.try_charge(UNIT):
        got += UNIT
    results.put(got)
    done.wait(60)
    budget.close()


def hold_worker(name: str, nbytes: int, ready) -> None:
    account = SharedBudget(name).open_account("doomed")
    assert account.try_charge(nbytes)
    ready.set()
    time.sleep(120)  # until SIGKILL


def greedy_worker(name: str, stop, drop, dropped) -> None:
    """Take one unit at a time while the budget lets it; once ``drop`` is set, give all back once."""
    budget = SharedBudget(name)
    account = budget.open_account("greedy")
    held, gave_back = 0, False
    while not stop.is_set():
        if drop.is_set() and not gave_back:
            account.release(held)
            held, gave_back = 0, True
            dropped.put(os.getpid())
        if account.try_charge(UNIT):
            held += UNIT
        else:
            time.sleep(0.001)
    budget.close()


# --- tests ---------------------------------------------------------------------------------------
def test_processes_charging_at_once_never_pass_the_limit_and_the_books_add_up(ledger_name):
    limit = 12 * UNIT
    budget = SharedBudget(ledger_name, limit)
    results, done = FORK.Queue(), FORK.Event()
    procs = [FORK.Process(target=stress_worker, args=(ledger_name, seed, 1500, results, done)) for seed in range(4)]
    for p in procs:
        p.start()
    try:
        reports = [results.get(timeout=120) for _ in procs]
        held = {pid: h for pid, h, _, _ in reports}
        assert sum(over for _, _, over, _ in reports) == 0
        assert sum(refused for *_, refused in reports) > 0  # they did contend for the limit
        assert {r.pid: r.charged for r in budget.rows()} == held
        assert budget.used() == sum(held.values()) <= limit
    finally:
        done.set()
        for p in procs:
            p.join(60)
    assert [p.exitcode for p in procs] == [0] * 4
    assert budget.used() == 0 and budget.rows() == []
    budget.close()


def test_spawned_processes_fill_the_budget_exactly(ledger_name):
    """Fresh interpreters (spawn) share nothing but the ledger file."""
    budget = SharedBudget(ledger_name, 40 * UNIT)
    spawn = mp.get_context("spawn")
    results, done = spawn.Queue(), spawn.Event()
    procs = [spawn.Process(target=fill_worker, args=(ledger_name, results, done)) for _ in range(2)]
    for p in procs:
        p.start()
    got = [results.get(timeout=120) for _ in procs]
    assert budget.used() == 40 * UNIT
    done.set()
    for p in procs:
        p.join(60)
    assert sum(got) == 40 * UNIT and [p.exitcode for p in procs] == [0, 0]
    assert budget.used() == 0  # each closed its budget: its share went back
    budget.close()


@pytest.mark.parametrize("joined", [True, False], ids=["joined", "zombie"])
def test_a_sigkilled_process_share_is_recovered(ledger_name, joined):
    """Killed while holding the whole budget: the next charge that needs the bytes reaps the dead
    slot, whether or not the parent has waited for the child yet (a zombie holds no memory)."""
    budget = SharedBudget(ledger_name, 10 * UNIT)
    account = budget.open_account("survivor")
    ready = FORK.Event()
    child = FORK.Process(target=hold_worker, args=(ledger_name, 10 * UNIT, ready))
    child.start()
    try:
        assert ready.wait(60)
        assert not account.try_charge(UNIT)
        assert [(r.label, r.alive) for r in budget.rows()] == [("survivor", True), ("doomed", True)]
        os.kill(child.pid, signal.SIGKILL)
        if joined:
            child.join(60)
        else:
            wait_until(lambda: open(f"/proc/{child.pid}/stat").read().rsplit(")", 1)[1].split()[0] == "Z", "zombie")
            assert [r.alive for r in budget.rows() if r.label == "doomed"] == [False]
        assert account.try_charge(10 * UNIT)
        assert [r.label for r in budget.rows()] == ["survivor"]
    finally:
        child.join(60)
        budget.close()


def test_opening_reaps_the_dead(ledger_name):
    ready = FORK.Event()
    child = FORK.Process(target=hold_worker, args=(ledger_name, 3 * UNIT, ready))
    child.start()
    assert ready.wait(60)
    os.kill(child.pid, signal.SIGKILL)
    child.join(60)
    with SharedBudget(ledger_name) as budget:
        assert budget.used() == 0 and budget.rows() == []


def test_a_process_that_exits_without_closing_gives_its_share_back_at_once(ledger_name):
    with SharedBudget(ledger_name, 10 * UNIT) as budget:
        code = f"from pyvattn import SharedBudget\nassert SharedBudget({ledger_name!r}).open_account('x').try_charge(7)"
        assert subprocess.run([sys.executable, "-c", code], timeout=120).returncode == 0
        assert budget.rows() == [] and budget.used() == 0  # rows() and used() do not reap: it gave back


def test_a_budget_dropped_unclosed_gives_its_share_back(ledger_name):
    with SharedBudget(ledger_name) as observer:
        kept = SharedBudget(ledger_name).open_account("kept")
        dropped = SharedBudget(ledger_name).open_account("dropped")
        assert kept.try_charge(5) and dropped.try_charge(7) and observer.used() == 12
        del dropped
        gc.collect()
        assert [(r.label, r.charged) for r in observer.rows()] == [("kept", 5)]
        kept.close()


def test_a_limit_changed_while_processes_charge_holds_at_once(ledger_name):
    budget = SharedBudget(ledger_name, 10 * UNIT)
    stop, drop, dropped = FORK.Event(), FORK.Event(), FORK.Queue()
    procs = [FORK.Process(target=greedy_worker, args=(ledger_name, stop, drop, dropped)) for _ in range(3)]
    for p in procs:
        p.start()
    try:
        wait_until(lambda: budget.used() == 10 * UNIT, "the first limit to fill")
        time.sleep(0.1)
        assert budget.used() == 10 * UNIT  # three processes pushing, not a byte over
        budget.set_limit(30 * UNIT)
        wait_until(lambda: budget.used() == 30 * UNIT, "the raised limit to fill")
        budget.set_limit(5 * UNIT)
        time.sleep(0.1)
        assert budget.used() == 30 * UNIT and budget.headroom() == 0  # nothing taken back, nothing more
        drop.set()
        for _ in procs:
            dropped.get(timeout=60)
        wait_until(lambda: budget.used() == 5 * UNIT, "the lowered limit to fill")
        time.sleep(0.1)
        assert budget.used() == 5 * UNIT
    finally:
        stop.set()
        for p in procs:
            p.join(60)
    assert [p.exitcode for p in procs] == [0, 0, 0] and budget.used() == 0
    budget.close()


def test_a_forked_child_opens_its_own_account(ledger_name):
    budget = SharedBudget(ledger_name, 10 * UNIT)
    parents = budget.open_account("parent")
    parents.try_charge(2 * UNIT)
    pid = os.fork()
    if pid == 0:  # the child: the parent's account is not its own; its own works; its exit keeps the parent's
        code = 1
        try:
            try:
                parents.try_charge(UNIT)
            except RuntimeError as exc:
                assert "opened by process" in str(exc)
                own = budget.open_account("child")
                assert own.try_charge(3 * UNIT) and budget.used() == 5 * UNIT
                budget.close()  # closes the child's account, not the parent's
                code = 0 if budget_used_in_new_handle(budget.name) == 2 * UNIT else 3
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert budget.used() == 2 * UNIT and parents.try_charge(UNIT)
    budget.close()


def budget_used_in_new_handle(name: str) -> int:
    with SharedBudget(name) as b:
        return b.used()


# --- opening rules and bad ledgers ---------------------------------------------------------------
def test_the_limit_rule_when_the_ledger_exists(ledger_name):
    with SharedBudget(ledger_name, "1GiB") as first:
        with SharedBudget(ledger_name) as attached:
            assert attached.limit == 1 << 30
        with SharedBudget(ledger_name, 1 << 30) as same:
            assert same.limit == 1 << 30
        with pytest.raises(BudgetLimitConflict, match="limit=2147483648 but budget .* has limit 1073741824"):
            SharedBudget(ledger_name, "2GiB")
        first.set_limit("2GiB")
        with SharedBudget(ledger_name, "2GiB") as now_same:
            assert now_same.limit == first.limit == 2 << 30


def test_a_closed_budget_says_so(ledger_name):
    budget = SharedBudget(ledger_name, 100)
    account = budget.open_account("a")
    budget.close()
    budget.close()  # idempotent
    for call in (lambda: budget.limit, budget.used, budget.rows, budget.headroom, lambda: budget.set_limit(5),
                 lambda: budget.open_account("b")):
        with pytest.raises(ValueError, match="is closed"):
            call()
    with pytest.raises(ValueError, match="'a' is closed"):
        account.try_charge(1)


def test_create_false_does_not_create(ledger_name):
    with pytest.raises(LedgerNotFound, match=ledger_name):
        SharedBudget(ledger_name, create=False)
    assert not ledger_path(ledger_name).exists()


@pytest.mark.parametrize("name", ["", "a/b", "../x", ".hidden", "x" * 65, "sp ace", 3, None])
def test_a_bad_name_is_a_value_error_naming_name(name):
    with pytest.raises(ValueError, match="name="):
        SharedBudget(name)


def _write_header(name: str, **fields) -> None:
    header = np.memmap(ledger_path(name), HEADER, "r+", shape=())
    for key, value in fields.items():
        header[key] = value
    header.flush()
    del header


@pytest.mark.parametrize("damage, message", [
    ("magic", "is not a pyvattn budget ledger"),
    ("version", f"version-{VERSION + 1} budget ledger; this pyvattn reads version {VERSION}"),
    ("truncated", "truncated or damaged"),
    ("garbage", "is not a pyvattn budget ledger"),
    ("negative", "damaged header or slots"),
    ("empty", "is not a pyvattn budget ledger"),
])
def test_a_damaged_ledger_is_a_clear_error(ledger_name, damage, message):
    SharedBudget(ledger_name, "1MiB").close()
    path = ledger_path(ledger_name)
    if damage == "magic":
        _write_header(ledger_name, magic=b"NOTITXXX")
    elif damage == "version":
        _write_header(ledger_name, version=VERSION + 1)
    elif damage == "truncated":
        os.truncate(path, FILE_BYTES - SLOT.itemsize)
    elif damage == "garbage":
        path.write_bytes(b"hello " * 1000)
    elif damage == "negative":
        slots = np.memmap(path, SLOT, "r+", offset=HEADER.itemsize, shape=(1,))
        slots["charged"] = -5
        slots.flush()
        del slots
    elif damage == "empty":
        path.write_bytes(b"")
    for create in (True, False):
        if damage == "empty" and create:
            continue  # an empty file is one being made: opening with create=True makes it
        with pytest.raises(LedgerCorrupt, match=message):
            SharedBudget(ledger_name, create=create)

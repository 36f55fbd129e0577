"""The budget contract in one process, on MemoryBudget and SharedBudget alike: all-or-nothing
charges, releases checked against what an account holds, limits lowered under use, close()
giving everything back, two threads, and an exception at every step of a charge."""

from __future__ import annotations

import os
import random
import threading
import uuid

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, invariant, rule

from faults import Injector
from pyvattn import LedgerFull, MemoryBudget, SharedBudget
from pyvattn.budget import UNLIMITED, ledger
from pyvattn.budget.ledger import SLOTS

KiB = 1024


@pytest.fixture
def ledger_name():
    name = f"test-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    yield name
    SharedBudget.remove(name)


@pytest.fixture(params=["memory", "shared"])
def make_budget(request, ledger_name):
    made = []

    def make(limit):
        budget = MemoryBudget(limit) if request.param == "memory" else SharedBudget(ledger_name, limit)
        made.append(budget)
        return budget

    yield make
    for budget in made:
        if isinstance(budget, SharedBudget):
            budget.close()


def test_charges_are_all_or_nothing_within_the_limit(make_budget):
    budget = make_budget("1KiB")
    assert budget.limit == KiB
    a, b = budget.open_account("a"), budget.open_account("b")
    assert a.try_charge(600) and a.headroom() == b.headroom() == 424
    assert not b.try_charge(425)  # one byte too many: nothing taken
    assert budget.used() == 600 and b.headroom() == 424
    assert b.try_charge(424) and budget.headroom() == 0
    assert not a.try_charge(1) and a.try_charge(0)
    assert sorted((r.label, r.charged) for r in budget.rows()) == [("a", 600), ("b", 424)]
    a.release(100)
    assert b.try_charge(100) and budget.used() == KiB


def test_release_more_than_held_is_refused_and_changes_nothing(make_budget):
    budget = make_budget(None)
    a, b = budget.open_account("a"), budget.open_account("b")
    a.try_charge(100)
    b.try_charge(50)
    with pytest.raises(ValueError, match="nbytes=101 is more than account 'a' holds"):
        a.release(101)
    assert budget.used() == 150
    a.release(100)
    with pytest.raises(ValueError, match="'a' holds"):
        a.release(1)  # b's bytes are not a's to give back
    assert budget.used() == 50


def test_unlimited_budget_has_unlimited_headroom_until_a_limit_is_set(make_budget):
    budget = make_budget(None)
    account = budget.open_account("a")
    assert budget.limit is None and account.headroom() == UNLIMITED
    assert account.try_charge(1 << 50)
    budget.set_limit("2PiB")
    assert account.headroom() == (2 << 50) - (1 << 50)


def test_a_limit_below_the_use_takes_nothing_back_and_refuses_charges_until_releases(make_budget):
    budget = make_budget(1000)
    account = budget.open_account("a")
    assert account.try_charge(800)
    budget.set_limit(500)
    assert budget.used() == 800 and account.headroom() == 0 and not account.try_charge(1)
    account.release(400)
    assert account.headroom() == 100 and not account.try_charge(101) and account.try_charge(100)
    budget.set_limit(None)
    assert account.try_charge(10**12)


def test_close_gives_everything_back_once_and_later_calls_are_safe(make_budget):
    budget = make_budget(1000)
    a, b = budget.open_account("a"), budget.open_account("b")
    a.try_charge(700)
    a.report(used=600, retained=100)
    a.close()
    a.close()  # idempotent
    assert budget.used() == 0 and [r.label for r in budget.rows()] == ["b"]
    a.release(700)  # a teardown releasing after close: nothing happens
    a.report(used=1, retained=1)
    with pytest.raises(ValueError, match="'a' is closed"):
        a.try_charge(1)
    with pytest.raises(ValueError, match="'a' is closed"):
        a.headroom()
    assert b.try_charge(1000)


def test_report_is_shown_in_rows(make_budget):
    budget = make_budget(None)
    account = budget.open_account("llama")
    account.try_charge(3 * KiB)
    account.report(used=2 * KiB, retained=KiB)
    [row] = budget.rows()
    assert (row.pid, row.label, row.charged, row.used, row.retained, row.alive) == \
        (os.getpid(), "llama", 3 * KiB, 2 * KiB, KiB, True)


@pytest.mark.parametrize("limit", [-1, "lots", 1.5, "1.5", True, [1]])
def test_a_bad_limit_is_a_value_error_naming_limit(make_budget, limit):
    with pytest.raises(ValueError, match="limit="):
        make_budget(limit)


def test_bad_arguments_are_value_errors_naming_them(make_budget):
    budget = make_budget("8GiB")
    assert budget.limit == 8 << 30
    account = budget.open_account("a")
    for nbytes in (-1, 1.5, "1KiB", None):
        with pytest.raises(ValueError, match="nbytes="):
            account.try_charge(nbytes)
        with pytest.raises(ValueError, match="nbytes="):
            account.release(nbytes)
    for label in ("", 7, "x" * 65):
        with pytest.raises(ValueError, match="label="):
            budget.open_account(label)
    with pytest.raises(ValueError, match="limit="):
        budget.set_limit("-3")
    assert budget.limit == 8 << 30 and budget.used() == 0


def test_two_threads_never_pass_the_limit_and_the_books_add_up(make_budget):
    """Two threads charge and release at random; after each charge the total is within the
    limit, and at the end each account holds exactly what its thread counted."""
    unit, limit = 4 * KiB, 10 * 4 * KiB
    budget = make_budget(limit)
    held, over, refused = {}, [], []

    def work(seed):
        account = budget.open_account(f"t{seed}")
        rng, mine = random.Random(seed), 0
        for _ in range(3000):
            if mine and rng.random() < 0.45:
                n = rng.randint(1, mine // unit) * unit
                account.release(n)
                mine -= n
            elif account.try_charge(n := rng.randint(1, 4) * unit):
                mine += n
                over.extend([budget.used()] if budget.used() > limit else [])
            else:
                refused.append(n)
        held[seed] = (account, mine)

    threads = [threading.Thread(target=work, args=(seed,)) for seed in (1, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not over and refused  # the limit was reached, and never passed
    assert {r.label: r.charged for r in budget.rows()} == {a.label: mine for a, mine in held.values()}
    assert budget.used() == sum(mine for _, mine in held.values()) <= limit


def test_shared_budgets_of_one_name_in_two_threads_share_one_limit(ledger_name):
    """Each thread its own SharedBudget object (its own open file, so flock orders them too)."""
    unit, limit = 1024, 50 * 1024
    budgets = [SharedBudget(ledger_name, limit) for _ in range(2)]
    got = [0, 0]

    def fill(i):
        account = budgets[i].open_account(f"t{i}")
        while account.try_charge(unit):
            got[i] += unit

    threads = [threading.Thread(target=fill, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(got) == limit == budgets[0].used() == budgets[1].used()
    for b in budgets:
        b.close()
    assert SharedBudget(ledger_name).used() == 0


def test_the_table_full_is_a_typed_error_and_a_closed_slot_is_reused(ledger_name):
    with SharedBudget(ledger_name) as budget:
        accounts = [budget.open_account(f"a{i}") for i in range(SLOTS)]
        with pytest.raises(LedgerFull, match=f"all {SLOTS} accounts"):
            budget.open_account("one too many")
        accounts[7].close()
        assert budget.open_account("again").try_charge(1)
        assert len(budget.rows()) == SLOTS


def _plant_dead_slots(budget: SharedBudget, count: int, nbytes: int, *, pid: int | None = None) -> None:
    """Slots of processes that are gone: ``pid`` with another start time (a reused pid), or by
    default pids past the kernel's largest (2**22), each its own."""
    with budget._ledger.locked():
        slots = budget._ledger.slots
        for i in range(count):
            j = int((slots["pid"] == 0).argmax())
            slots[j] = ((1 << 22) + 1 + i if pid is None else pid, 1 + i, ledger.pid_namespace(), nbytes, 0, 0,
                        f"dead{i}".encode())


def test_a_reused_pid_does_not_keep_a_dead_share(ledger_name):
    with SharedBudget(ledger_name, 1000) as budget:
        _plant_dead_slots(budget, 2, 400, pid=os.getpid())
        account = budget.open_account("alive")
        assert budget.used() == 800
        assert [r.alive for r in budget.rows()] == [False, False, True]
        assert account.try_charge(900)  # would fail: the dead shares are reaped first
        assert [r.label for r in budget.rows()] == ["alive"] and budget.used() == 900


@pytest.mark.parametrize("at", range(1, 4))
def test_an_exception_at_any_step_of_a_reaping_charge_leaves_the_books_true(ledger_name, monkeypatch, at):
    """KeyboardInterrupt at the n-th liveness check while a charge reaps: the charge does not
    happen, the lock is free again, and the next charge reaps and succeeds."""
    with SharedBudget(ledger_name, 1000) as budget:
        account = budget.open_account("alive")
        account.try_charge(100)
        _plant_dead_slots(budget, 3, 300)
        injector = Injector(at)
        injector.install(monkeypatch, ledger, ["start_time"])
        monkeypatch.setattr("pyvattn.budget.shared.start_time", ledger.start_time)
        with pytest.raises(KeyboardInterrupt):
            account.try_charge(500)
        monkeypatch.undo()
        rows = {r.label: r.charged for r in budget.rows()}
        assert rows["alive"] == 100 and budget.used() == sum(rows.values())
        assert account.try_charge(500) and budget.used() == 600


def _locks_are_free(name: str) -> bool:
    """Another open of the ledger (its own flock) and this process's threads can lock it now."""
    result = []
    probe = threading.Thread(target=lambda: result.append(SharedBudget(name).used()), daemon=True)
    probe.start()
    probe.join(10)
    return bool(result)


@pytest.mark.parametrize("at", range(1, 13))
def test_an_exception_at_any_lock_call_leaves_no_lock_held_and_the_books_true(ledger_name, monkeypatch, at):
    """KeyboardInterrupt at the n-th flock call of an account's life: whichever call it hits,
    no lock stays held (another open of the ledger gets it at once), every slot's charge is what
    its account holds, and closing gives it all back."""
    import fcntl

    budget = SharedBudget(ledger_name, 1000)
    injector = Injector(at)
    injector.install(monkeypatch, fcntl, ["flock"])
    accounts = []
    with pytest.raises(KeyboardInterrupt):
        accounts.append(budget.open_account("a"))
        accounts[0].try_charge(300)
        accounts[0].release(100)
        accounts[0].headroom()
        accounts[0].close()
        budget.open_account("b").try_charge(5)
    monkeypatch.undo()
    assert injector.fired == 1
    assert _locks_are_free(ledger_name)
    assert budget.used() == sum(r.charged for r in budget.rows()) <= 1000
    budget.close()
    assert SharedBudget(ledger_name).used() == 0 and SharedBudget(ledger_name).rows() == []


class BudgetModel(RuleBasedStateMachine):
    """Random sequences of the budget's calls against a model of what each account holds: every
    answer (a charge taken or refused, a release refused, headroom, used, rows) as the model says."""

    kind = "memory"
    accounts = Bundle("accounts")

    def __init__(self):
        super().__init__()
        self.name = f"test-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.limit = 16  # small against the charges, so that exact fits and refusals are common
        self.budget = MemoryBudget(self.limit) if self.kind == "memory" else SharedBudget(self.name, self.limit)
        self.held: dict[int, int] = {}  # id(account) -> bytes, open accounts only

    def teardown(self):
        if isinstance(self.budget, SharedBudget):
            self.budget.close()
            SharedBudget.remove(self.name)

    @rule(target=accounts, label=st.sampled_from(["a", "b", "c"]))
    def open(self, label):
        account = self.budget.open_account(label)
        self.held[id(account)] = 0
        return account

    @rule(account=accounts, nbytes=st.integers(0, 8))
    def charge(self, account, nbytes):
        if id(account) not in self.held:
            with pytest.raises(ValueError, match="is closed"):
                account.try_charge(nbytes)
            return
        fits = self.limit is None or sum(self.held.values()) + nbytes <= self.limit or nbytes == 0
        assert account.try_charge(nbytes) == fits
        self.held[id(account)] += nbytes * fits

    @rule(account=accounts, nbytes=st.integers(0, 8))
    def release(self, account, nbytes):
        if id(account) in self.held and nbytes > self.held[id(account)]:
            with pytest.raises(ValueError, match="more than account"):
                account.release(nbytes)
        else:
            account.release(nbytes)  # a closed account: nothing happens
            if id(account) in self.held:
                self.held[id(account)] -= nbytes

    @rule(account=accounts)
    def close(self, account):
        account.close()
        self.held.pop(id(account), None)

    @rule(limit=st.one_of(st.none(), st.integers(0, 24)))
    def set_limit(self, limit):
        self.budget.set_limit(limit)
        self.limit = limit

    @invariant()
    def books_equal_the_model(self):
        used = sum(self.held.values())
        assert self.budget.used() == used
        assert self.budget.headroom() == (UNLIMITED if self.limit is None else max(0, self.limit - used))
        assert sorted(r.charged for r in self.budget.rows()) == sorted(self.held.values())


class SharedBudgetModel(BudgetModel):
    kind = "shared"


TestMemoryBudgetModel = BudgetModel.TestCase
TestSharedBudgetModel = SharedBudgetModel.TestCase
for _case in (TestMemoryBudgetModel, TestSharedBudgetModel):
    _case.settings = settings(max_examples=40, stateful_step_count=30, deadline=None)

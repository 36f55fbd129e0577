"""A cache's memory budget changed while it runs (issue 15, item 2), and budgets shared by several
caches (item 3): data written before is read back intact after every change, the memory given
back is really gone (the memfd's allocated blocks), a refused change changes nothing, and a
failure at any driver call leaves the books equal to reality."""

from __future__ import annotations

import pytest
import torch

from books import check_cache
from cachemodel import small_cache
from faults import HOST_DRIVER_CALLS, Injector
from kvdata import check, write
from pyvattn import BudgetTooSmall, KVCache, MemoryBudget, OutOfPages
from pyvattn._ffi import libc

P = 4096  # small_cache: 16 tokens per page, 4 regions, 4 slots of 128 tokens


def _two_requests(cache):
    """Slot a: 64 tokens written and running; slot b: 96 tokens written, then finished (retained)."""
    a, b = cache.alloc_slot(), cache.alloc_slot()
    cache.step({a: 64, b: 96})
    write(cache, a, 1, 0, 64)
    write(cache, b, 2, 0, 96)
    cache.free_slot(b)
    return a


def test_growing_the_budget_takes_effect_at_once():
    with small_cache(budget_pages=8) as cache:
        a = cache.alloc_slot()
        with pytest.raises(OutOfPages):
            cache.step({a: 64})  # 4 pages a region: 16 pages
        cache.set_memory_budget("64KiB")
        cache.step({a: 64})
        write(cache, a, 1, 0, 64)
        check(cache, a, 1, 64)
        check_cache(cache)


def test_shrinking_releases_pooled_then_retained_pages_and_keeps_running_data():
    with small_cache(budget_pages=40, deferred_reclaim=True) as cache:
        a = _two_requests(cache)
        cache.reserve(40 * P)  # the rest of the budget, pooled
        assert cache.backend.allocated_bytes() == 40 * P
        cache.set_memory_budget(24 * P)  # a needs 16 pages; b's 24 retained pages must partly go
        assert cache.pool.total_pages <= 24 and cache.backend.allocated_bytes() == cache.pool.total_pages * P
        check(cache, a, 1, 64)
        check_cache(cache)
        cache.set_memory_budget(16 * P)  # exactly what a needs: everything else goes
        assert cache.backend.allocated_bytes() == 16 * P and cache.stats()["retained_bytes"] == 0
        check(cache, a, 1, 64)
        assert cache.free_tokens() == 0 and cache.can_admit(0) and not cache.can_admit(1)


def test_shrinking_below_what_running_requests_hold_raises_and_changes_nothing():
    with small_cache(budget_pages=40) as cache:
        a = _two_requests(cache)
        before, blocks = cache.stats(), cache.backend.allocated_bytes()
        with pytest.raises(BudgetTooSmall, match="when_free") as err:
            cache.set_memory_budget(15 * P)
        assert err.value.needed == 16 * P and err.value.available == 15 * P
        assert cache.stats() == before and cache.backend.allocated_bytes() == blocks
        check(cache, a, 1, 64)
        check_cache(cache)


def test_when_free_shrinks_as_requests_finish():
    with small_cache(budget_pages=40) as cache:
        a = _two_requests(cache)
        c = cache.alloc_slot()
        cache.step({c: 32})
        write(cache, c, 3, 0, 32)
        cache.set_memory_budget(20 * P, when_free=True)  # a and c need 24 pages
        assert cache.pool.total_pages == 24 and cache.pool.budget_pages == 20
        assert cache.free_tokens() == 0 and not cache.can_admit(1)  # no new request until it fits
        with pytest.raises(OutOfPages):
            cache.step({a: 80})  # growth is held to the new budget at once
        check(cache, a, 1, 64)
        cache.free_slot(c)  # c's pages go back to the OS until the budget holds (the rest retained)
        assert cache.pool.total_pages == 20 and cache.backend.allocated_bytes() == 20 * P
        cache.step({a: 80})  # 20 pages: fits now
        write(cache, a, 1, 64, 80)
        check(cache, a, 1, 80)
        check_cache(cache)


@pytest.mark.parametrize("args, name", [(("lots",), "size"), ((-1,), "size"), ((P, "yes"), "when_free")])
def test_bad_arguments_name_themselves(args, name):
    with small_cache() as cache, pytest.raises(ValueError, match=name):
        cache.set_memory_budget(*args)


def test_a_failure_at_any_driver_call_of_a_shrink_leaves_the_books_true_and_the_data_intact(monkeypatch):
    """Every libc call of the shrink fails in turn (KeyboardInterrupt); then the books equal the
    OS, the running request's data is intact, and retrying finishes the shrink."""
    fired, at = 0, 0
    while True:
        at += 1
        cache = small_cache(budget_pages=40)
        try:
            a = _two_requests(cache)
            cache.reserve(40 * P)
            injector = Injector(at)
            with pytest.MonkeyPatch.context() as mp:
                injector.install(mp, libc, HOST_DRIVER_CALLS)
                try:
                    cache.set_memory_budget(16 * P)
                except KeyboardInterrupt:
                    pass
            check_cache(cache)
            check(cache, a, 1, 64)
            if not injector.fired:
                break
            fired += 1
            cache.set_memory_budget(16 * P)
            assert cache.backend.allocated_bytes() == 16 * P
            check(cache, a, 1, 64)
        finally:
            cache.close()
    assert fired >= 3


def test_caches_sharing_one_memory_budget_grow_within_it_together():
    budget = MemoryBudget(48 * P)
    def make():
        return KVCache(2, 1, 64, 4, 128, torch.float32, device="cpu", page_size=P, backend="host",
                       memory_budget=budget)

    with make() as x, make() as y:
        assert x.free_tokens() == y.free_tokens() == 128  # 12 pages a region each, but one slot's max
        a = x.alloc_slot()
        x.step({a: 128})  # 32 pages
        write(x, a, 1, 0, 128)
        assert budget.used() == x.pool.total_pages * P == 32 * P
        assert y.free_tokens() == 64 and y.can_admit(64) and not y.can_admit(65)
        b = y.alloc_slot()
        with pytest.raises(OutOfPages):
            y.step({b: 80})
        y.step({b: 64})
        write(y, b, 2, 0, 64)
        assert budget.used() == 48 * P and budget.headroom() == 0
        x.free_slot(a)
        assert budget.used() == 48 * P  # retained under deferred reclaim: still x's
        x.trim()  # gives it back to the budget
        assert budget.used() == 16 * P
        y.step({b: 128})
        write(y, b, 2, 64, 128)
        check(y, b, 2, 128)
        budget.set_limit(32 * P)  # lowered under them: nothing taken back, no more growth
        c = x.alloc_slot()
        assert not x.can_admit(1) and x.free_tokens() == 0
        with pytest.raises(OutOfPages):
            x.step({c: 1})
        rows = {r.label: r for r in budget.rows()}
        assert sum(r.charged for r in rows.values()) == 32 * P
        check_cache(x)
        check_cache(y)
    assert budget.used() == 0 and budget.rows() == []  # closing gave everything back


_CHILD = """
import sys, time, torch
from pyvattn import KVCache, SharedBudget
budget = SharedBudget(sys.argv[1])
cache = KVCache(2, 1, 64, 4, 128, torch.float32, device="cpu", page_size=4096, backend="host",
                memory_budget=budget)
slot = cache.alloc_slot()
cache.step({slot: int(sys.argv[2])})
cache.k[0][slot, :int(sys.argv[2])] = 7.0
print("mapped", cache.stats()["physical_bytes"], flush=True)
time.sleep(600)
"""


def test_processes_share_a_shared_budget_and_a_killed_one_gives_its_share_back(tmp_path):
    """A child process's cache takes 32 pages of a 48-page SharedBudget; this process's cache gets
    only the rest. The child is killed (SIGKILL: no clean-up runs) and its share comes back."""
    import os
    import signal
    import subprocess
    import sys

    from pyvattn import SharedBudget

    name = f"test-i15-{os.getpid()}"
    budget = SharedBudget(name, 48 * P)
    child = subprocess.Popen([sys.executable, "-c", _CHILD, name, "128"], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().split() == ["mapped", str(32 * P)]
        assert budget.used() == 32 * P
        with KVCache(2, 1, 64, 4, 128, torch.float32, device="cpu", page_size=P, backend="host",
                     memory_budget=budget) as cache:
            a = cache.alloc_slot()
            assert cache.free_tokens() == 64 and not cache.can_admit(65)
            with pytest.raises(OutOfPages):
                cache.step({a: 65})
            cache.step({a: 64})
            write(cache, a, 1, 0, 64)
            child.send_signal(signal.SIGKILL)
            child.wait()
            assert cache.free_tokens() == 128  # 32 pages of headroom again: the dead share is back
            cache.step({a: 128})  # the dead child's share is reclaimed when a charge needs it
            write(cache, a, 1, 64, 128)
            check(cache, a, 1, 128)
            assert budget.used() == 32 * P
        assert budget.used() == 0
    finally:
        child.kill()
        child.wait()
        SharedBudget.remove(name)


def test_a_cache_asleep_under_a_budget_lowered_with_when_free_wakes_with_its_requests():
    """Running requests keep what they need under a when_free budget, across sleep too."""
    with small_cache(budget_pages=40) as cache:
        a = _two_requests(cache)
        cache.set_memory_budget(0, when_free=True)
        cache.sleep(keep=True)
        assert cache.backend.allocated_bytes() == 0
        cache.wake()
        assert cache.pool.budget_pages == 0 and cache.pool.total_pages == 16
        check(cache, a, 1, 64)
        cache.free_slot(a)
        assert cache.backend.allocated_bytes() == 0
        check_cache(cache)

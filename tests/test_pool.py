"""PagePool on the host backend: batching, budget, all-or-nothing take."""

from __future__ import annotations

import pytest

from pyvattn import OutOfPages, PagePool
from pyvattn.backends.host import HostBackend


@pytest.fixture
def backend():
    b = HostBackend(page_size=64 << 10)
    yield b
    b.close()


def test_take_grows_in_batches_and_reuses_given_pages(backend):
    pool = PagePool(backend, grow_pages=16)
    a = pool.take(3)
    assert pool.total_pages == 16 and pool.free_pages == 13 and pool.create_calls == 1
    b = pool.take(13)
    assert pool.create_calls == 1 and not set(a) & set(b)
    pool.give(a)
    assert sorted(pool.take(3)) == sorted(a)
    assert pool.create_calls == 1


def test_budget_is_never_exceeded_and_failure_hands_out_nothing(backend):
    pool = PagePool(backend, budget_pages=10, grow_pages=8)
    got = pool.take(6)
    with pytest.raises(OutOfPages) as err:
        pool.take(5)  # 2 free + 2 more allowed = 4 < 5
    assert err.value.needed == 5 and err.value.available == 4
    assert pool.total_pages == 8 and pool.free_pages == 2
    more = pool.take(4)  # the batch is clipped to the budget
    assert pool.total_pages == 10 and len(set(got + more)) == 10


def test_reserve_and_trim_return_memory(backend):
    pool = PagePool(backend, budget_pages=64)
    assert pool.reserve(32 * backend.page_size) == 32
    assert backend.allocated_bytes() == 32 * backend.page_size
    assert pool.reserve(10 * backend.page_size) == 0  # already there
    with pytest.raises(OutOfPages):
        pool.reserve(65 * backend.page_size)
    held = pool.take(4)
    assert pool.trim(keep_pages=8) == 20
    assert backend.allocated_bytes() == 12 * backend.page_size
    pool.give(held)
    pool.close()
    assert backend.allocated_bytes() == 0 and pool.total_pages == 0


def test_bad_arguments(backend):
    with pytest.raises(ValueError, match="budget_pages"):
        PagePool(backend, budget_pages=-1)
    with pytest.raises(ValueError, match="grow_pages"):
        PagePool(backend, grow_pages=0)

"""Reclaim.plan: which mapped pages a step takes back, as a pure function of per-slot counts (no
backend needed)."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from pyvattn.core.reclaim import Reclaim
from pyvattn.frag.memory import UnitMemory

REGIONS = 4


@st.composite
def slot_tables(draw):
    n = draw(st.integers(1, 12))
    held = np.array(draw(st.lists(st.integers(0, 20), min_size=n, max_size=n)), dtype=np.int64)
    active = np.array(draw(st.lists(st.booleans(), min_size=n, max_size=n)))
    keep = np.array([draw(st.integers(0, 22)) if a else 0 for a in active], dtype=np.int64)
    count = draw(st.integers(1, int(np.maximum(held - keep, 0).sum()) * REGIONS + 8))
    return held, active, keep, count


@settings(max_examples=100, deadline=None, database=None)
@given(slot_tables())
def test_a_plan_takes_enough_whole_pages_and_never_what_a_slot_must_keep(table):
    held, active, keep, count = table
    reclaim = Reclaim(held, active, REGIONS)
    plan = reclaim.plan(count, keep)
    taken = dict(plan)
    assert len(taken) == len(plan)  # a slot at most once
    for slot, pages in plan:
        assert 0 < pages <= held[slot] - keep[slot]
    if count <= reclaim.reclaimable(keep):
        assert sum(taken.values()) * REGIONS >= count
        assert sum(taken.values()) * REGIONS < count + REGIONS  # no more than the rounding to whole pages
    else:
        assert sum(taken.values()) * REGIONS == reclaim.reclaimable(keep)
    # finished requests' slots give before active ones; within each, the one with most to give
    order = [(bool(active[s]), -(held[s] - keep[s]), s) for s, _ in plan]
    assert order == sorted(order)
    finished_left = [s for s in range(len(held)) if not active[s] and held[s] > keep[s] and s not in taken]
    assert not (finished_left and any(active[s] for s in taken))


@settings(max_examples=100, deadline=None, database=None)
@given(slot_tables())
def test_the_fragmentation_model_reclaims_exactly_as_the_cache_plans(table):
    """frag's simulation (UnitMemory) copies KVCache's reclaim policy so that measured runs agree
    with simulated ones step by step: both must leave every slot with the same pages."""
    held, active, keep, count = table
    reclaim = Reclaim(held, active, REGIONS)
    if count > reclaim.reclaimable(keep):
        return
    after = held.copy()
    for slot, pages in reclaim.plan(count, keep):
        after[slot] -= pages
    model = UnitMemory(1, 1, REGIONS, len(held), 1, None, True)
    model.units, model.active, model.total_units = held.copy(), active.copy(), int(held.sum())
    assert model._reclaim(count, keep)
    assert np.array_equal(model.units, after)


def test_a_worked_example():
    held = np.array([6, 3, 8, 5])
    active = np.array([True, False, True, False])
    keep = np.array([2, 0, 8, 0])
    plan = Reclaim(held, active, regions=2).plan(14, keep)  # 7 pages per region
    assert plan == [(3, 5), (1, 2)]  # finished slots, most first; active slot 0 keeps its 4 spare
    assert Reclaim(held, active, regions=2).reclaimable(keep) == 2 * (4 + 3 + 0 + 5)


@st.composite
def shared_tables(draw):
    """Slots whose first pages may be another slot's (forks of forks), as prefix sharing leaves them."""
    n, width = draw(st.integers(1, 8)), 8
    pages = np.full((n, width), -1, dtype=np.int64)
    held = np.zeros(n, dtype=np.int64)
    fresh = 100
    for s in range(n):
        held[s] = draw(st.integers(0, width))
        shared = 0
        if s and held[s]:
            src = draw(st.integers(0, s - 1))
            shared = min(draw(st.integers(0, width)), int(held[src]), int(held[s]))
            pages[s, :shared] = pages[src, :shared]
        pages[s, shared:held[s]] = np.arange(fresh, fresh + held[s] - shared)
        fresh += width
    active = np.array(draw(st.lists(st.booleans(), min_size=n, max_size=n)))
    keep = np.array([draw(st.integers(0, int(h))) if a else 0 for a, h in zip(active, held)], dtype=np.int64)
    age = np.array(draw(st.lists(st.integers(0, 50), min_size=n, max_size=n)), dtype=np.int64)
    count = draw(st.integers(1, int(held.sum()) * REGIONS + 8))
    return held, active, keep, pages, age, count


@settings(max_examples=150, deadline=None, database=None)
@given(shared_tables())
def test_with_shared_pages_a_plan_frees_what_it_promises(table):
    """A shared page comes free only when every slot mapping it gives it back: ``reclaimable``
    counts exactly those (brute force below), and applying the plan frees at least ``count``
    pages when it can, never taking what a slot must keep."""
    held, active, keep, pages, age, count = table
    reclaim = Reclaim(held, active, REGIONS, pages, age)
    mapped = {(s, i): int(pages[s, i]) for s in range(len(held)) for i in range(held[s])}
    owners: dict[int, set] = {}
    for at, h in mapped.items():
        owners.setdefault(h, set()).add(at)
    excess = {(s, i) for (s, i) in mapped if i >= keep[s]}
    assert reclaim.reclaimable(keep) == REGIONS * sum(places <= excess for places in owners.values())
    plan = reclaim.plan(count, keep)
    assert len(dict(plan)) == len(plan)
    given = set()
    for slot, n in plan:
        assert 0 < n <= held[slot] - keep[slot]
        given |= {(slot, i) for i in range(held[slot] - n, held[slot])}
    freed = sum(places <= given for places in owners.values()) * REGIONS
    assert freed >= min(count, reclaim.reclaimable(keep))
    for slot, n in plan:  # a slot gives back nothing that stays mapped elsewhere below what came free
        lowest = held[slot] - n
        assert owners[mapped[(slot, lowest)]] <= given, "a slot gave back a page that did not come free"


def test_a_shared_prefix_comes_free_only_with_its_last_mapping():
    # slot 1 forked slot 0's two pages; both finished. Slot 0 alone frees only its own top page.
    pages = np.array([[10, 11, 12], [10, 11, 20]])
    held, active = np.array([3, 3]), np.array([False, False])
    reclaim = Reclaim(held, active, 1, pages, np.array([1, 2]))
    keep = np.zeros(2, dtype=np.int64)
    assert reclaim.reclaimable(keep) == 4
    assert reclaim.plan(1, keep) == [(0, 1)]  # the older slot 0's own page
    assert reclaim.plan(2, keep) == [(0, 1), (1, 1)]  # each own page first: nothing shared yet
    assert reclaim.plan(3, keep) == [(0, 2), (1, 2)]  # shared page 11: both let go; 10 stays

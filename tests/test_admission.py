"""Admission ahead of time (issue 15): ``free_tokens()`` and ``can_admit()`` say exactly what
``alloc_slot`` + ``step`` then do, whatever the cache went through (growth, reclaim, a budget
changed at run time, sleep and wake, faults), and neither ``set_memory_budget`` nor sleep/wake
breaks the model's books or data.
A hypothesis state machine over the shared cache model (tests/cachemodel.py)."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from cachemodel import MAX_LEN, SLOTS, CacheModel, small_cache
from pyvattn import BudgetTooSmall
from pyvattn.core.elastic import needed_pages


class AdmissionMachine(RuleBasedStateMachine):
    @initialize(deferred=st.booleans(), budget=st.integers(4, 40))
    def open(self, deferred, budget):
        self.model = CacheModel(small_cache(deferred_reclaim=deferred, budget_pages=budget))

    def teardown(self):
        if hasattr(self, "model"):
            self.model.cache.close()

    def _active(self):
        return sorted(self.model.lengths)

    @rule(prompt=st.integers(0, MAX_LEN))
    def admit(self, prompt):
        """can_admit(prompt) is True exactly when the alloc_slot + step that admits it succeeds."""
        cache = self.model.cache
        expect = cache.can_admit(prompt)
        full = len(self.model.lengths) == SLOTS
        assert expect == (not full and prompt <= cache.free_tokens())
        if full:
            return
        before = set(self.model.lengths)
        self.model.alloc(prompt)
        (slot,) = set(self.model.lengths) - before
        admitted = self.model.step({slot: prompt})
        assert admitted == expect, f"can_admit({prompt}) said {expect}, the step {'did' if admitted else 'did not'} fit"
        if not admitted:
            self.model.free(slot)

    @rule(prompt=st.integers(0, MAX_LEN), family=st.integers(0, 2))
    def admit_with_prefix(self, prompt, family):
        """The same with prefix reuse (issue 14): what can_admit promises still holds when part
        of the prompt is found in a finished or running request's pages."""
        cache = self.model.cache
        expect = cache.can_admit(prompt)
        slot = self.model.alloc(prompt, family)
        if slot is None:
            return
        admitted = self.model.step({slot: prompt})
        if expect:
            assert admitted, f"can_admit({prompt}) said it fits; with a prefix hit the step failed"
        if not admitted:
            self.model.free(slot)

    @precondition(lambda self: self.model.lengths)
    @rule(data=st.data(), tokens=st.integers(0, MAX_LEN))
    def fork(self, data, tokens):
        self.model.fork(data.draw(st.sampled_from(self._active())), tokens)

    @precondition(lambda self: self.model.lengths)
    @rule(tokens=st.integers(1, 40))
    def decode(self, tokens):
        self.model.step({s: min(MAX_LEN, n + tokens) for s, n in self.model.lengths.items()})

    @precondition(lambda self: self.model.lengths)
    @rule(data=st.data())
    def free(self, data):
        self.model.free(data.draw(st.sampled_from(self._active())))

    @rule()
    def trim(self):
        self.model.trim()

    @rule(pages=st.integers(0, 40), when_free=st.booleans())
    def set_budget(self, pages, when_free):
        cache = self.model.cache
        need, before = needed_pages(cache), cache.pool.budget_pages
        try:
            cache.set_memory_budget(pages * cache.page_size, when_free=when_free)
        except BudgetTooSmall as exc:
            assert not when_free and need > pages and exc.needed == need * cache.page_size
            assert cache.pool.budget_pages == before
            return
        assert cache.pool.budget_pages == pages
        assert cache.pool.total_pages <= max(pages, need)

    @precondition(lambda self: self.model.lengths)
    @rule(data=st.data(), at=st.integers(1, 12), enomem=st.booleans())
    def step_with_a_fault(self, data, at, enomem):
        slot = data.draw(st.sampled_from(self._active()))
        self.model.with_fault(at, enomem, self.model.step, {slot: data.draw(st.integers(0, MAX_LEN))})

    @rule(keep=st.booleans(), at=st.integers(0, 8), enomem=st.booleans())
    def sleep_and_wake(self, keep, at, enomem):
        """Sleep (a fault at the ``at``-th libc call, 0: none) releases everything; wake gives
        back a cache the model cannot tell from the one before."""
        cache = self.model.cache
        if self.model.lengths and not keep:
            with pytest.raises(ValueError, match="keep=True"):
                cache.sleep()
            return
        if at:
            self.model.with_fault(at, enomem, cache.sleep, keep)
        if cache.asleep or not at:
            cache.sleep(keep=keep)  # finishes what a fault left
        assert cache.backend.allocated_bytes() == 0 and cache.pool.total_pages == 0
        cache.wake()

    @invariant()
    def books_equal_reality(self):
        if hasattr(self, "model"):
            self.model.check()
            pool = self.model.cache.pool
            if pool.budget_pages is not None:  # a budget lowered with when_free: only needed pages over it
                assert pool.total_pages <= max(pool.budget_pages, needed_pages(self.model.cache))


AdmissionMachine.TestCase.settings = settings(
    max_examples=25, stateful_step_count=30, deadline=None, database=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
test_can_admit_agrees_with_step = AdmissionMachine.TestCase


def test_free_tokens_counts_pool_budget_and_reclaimable_pages_in_whole_pages_of_every_region():
    with small_cache(budget_pages=24) as cache:  # 16 tokens per page, 4 regions: 6 pages a slot
        assert cache.free_tokens() == 6 * 16
        a = cache.alloc_slot()
        cache.step({a: 33})  # 3 pages per region
        assert cache.free_tokens() == 3 * 16
        cache.free_slot(a)  # its pages stay mapped (deferred reclaim) but count as reclaimable
        assert cache.stats()["retained_bytes"] > 0 and cache.free_tokens() == 6 * 16
        cache.set_memory_budget(22 * 4096)  # 5.5 pages a region: whole pages only
        assert cache.free_tokens() == 5 * 16 and cache.can_admit(80) and not cache.can_admit(81)


def test_no_free_slot_means_nothing_fits():
    with small_cache() as cache:
        for _ in range(SLOTS):
            cache.alloc_slot()
        assert cache.free_tokens() == 0 and not cache.can_admit(0)


@pytest.mark.parametrize("bad", [-1, MAX_LEN + 1, 1.5, True, "8", None])
def test_can_admit_rejects_bad_lengths_naming_the_argument(bad):
    with small_cache() as cache, pytest.raises(ValueError, match="seq_len"):
        cache.can_admit(bad)


def test_over_a_budget_lowered_when_free_nothing_fits_but_an_empty_request():
    """Found by the state machine: a budget lowered to 0 with ``when_free`` while pages are held,
    then a prefix taken over in place (its pages become needed again): headroom went negative and
    free_tokens() said -16, can_admit(0) False, though a request of 0 tokens needs no page."""
    m = AdmissionMachine()
    try:
        m.open(deferred=True, budget=4)
        for rule, kwargs in [("admit", {"prompt": 39}), ("admit_with_prefix", {"family": 0, "prompt": 16}),
                             ("admit", {"prompt": 0}), ("admit", {"prompt": 2}),
                             ("set_budget", {"pages": 0, "when_free": True}), ("admit", {"prompt": 0}),
                             ("admit_with_prefix", {"family": 0, "prompt": 17})]:
            getattr(m, rule)(**kwargs)
            m.books_equal_reality()
        cache = m.model.cache
        assert cache.free_tokens() == 0
        assert cache.can_admit(0) and not cache.can_admit(1)
        m.admit(prompt=0)  # can_admit agrees with the step
        m.books_equal_reality()
    finally:
        m.teardown()

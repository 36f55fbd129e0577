"""A model-based property test of the whole KVCache API on the host backend, with failures
injected at driver calls (hypothesis' rule-based state machine; the same model drives the long
run in scripts/soak.py). After every rule: the books against /proc/self/maps and the memfd, the
slot table, every handle accounted for, the stats identity and every token written."""

from __future__ import annotations

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from cachemodel import MAX_LEN, CacheModel, small_cache


class CacheMachine(RuleBasedStateMachine):
    @initialize(deferred=st.booleans())
    def open(self, deferred):
        self.model = CacheModel(small_cache(deferred_reclaim=deferred))

    def teardown(self):
        if hasattr(self, "model"):
            self.model.cache.close()

    def _active(self):
        return sorted(self.model.lengths)

    @rule(hint=st.integers(0, MAX_LEN))
    def alloc(self, hint):
        self.model.alloc(hint)

    @rule(prompt=st.integers(1, MAX_LEN))
    def admit(self, prompt):
        """A request arrives: a slot (best fit for its prompt), then the prefill step."""
        before = set(self.model.lengths)
        self.model.alloc(prompt)
        for slot in set(self.model.lengths) - before:
            self.model.step({slot: prompt})

    @rule(prompt=st.integers(1, MAX_LEN), family=st.integers(0, 2))
    def admit_prompt(self, prompt, family):
        """A request whose prompt may share a prefix with earlier ones: the cache reuses it (a
        finished request's slot in place, or a running request's pages), then the prefill step."""
        slot = self.model.alloc(prompt, family)
        if slot is not None:
            self.model.step({slot: prompt})

    @precondition(lambda self: self.model.lengths)
    @rule(data=st.data(), share=st.floats(0, 1))
    def fork(self, data, share):
        src = data.draw(st.sampled_from(self._active()))
        self.model.fork(src, int(share * self.model.lengths[src]))

    @precondition(lambda self: self.model.lengths)
    @rule(tokens=st.integers(1, 24), background=st.booleans())
    def decode(self, tokens, background):
        """Every running request grows by ``tokens``."""
        self.model.step({s: min(MAX_LEN, n + tokens) for s, n in self.model.lengths.items()},
                        background=background)

    @precondition(lambda self: self.model.lengths)
    @rule(data=st.data(), form=st.sampled_from(["dict", "dict", "tensor", "ndarray", "list"]),
          background=st.booleans())
    def step(self, data, form, background):
        slots = data.draw(st.lists(st.sampled_from(self._active()), min_size=1, unique=True))
        lens = {s: data.draw(st.integers(0, MAX_LEN)) for s in slots}
        self.model.step(lens, form, background)

    @precondition(lambda self: self.model.lengths)
    @rule(data=st.data())
    def free(self, data):
        self.model.free(data.draw(st.sampled_from(self._active())))

    @rule()
    def trim(self):
        self.model.trim()

    @rule(pages=st.integers(0, 32))
    def reserve(self, pages):
        self.model.reserve(pages)

    @precondition(lambda self: self.model.lengths)
    @rule(data=st.data(), at=st.integers(1, 12), enomem=st.booleans())
    def step_with_a_fault(self, data, at, enomem):
        slot = data.draw(st.sampled_from(self._active()))
        self.model.with_fault(at, enomem, self.model.step, {slot: data.draw(st.integers(0, MAX_LEN))})

    @precondition(lambda self: self.model.lengths)
    @rule(data=st.data(), at=st.integers(1, 6), enomem=st.booleans())
    def free_with_a_fault(self, data, at, enomem):
        self.model.with_fault(at, enomem, self.model.free, data.draw(st.sampled_from(self._active())))

    @rule(at=st.integers(1, 6), enomem=st.booleans())
    def trim_with_a_fault(self, at, enomem):
        self.model.with_fault(at, enomem, self.model.trim)

    @invariant()
    def books_equal_reality(self):
        if hasattr(self, "model"):
            self.model.check()


CacheMachine.TestCase.settings = settings(
    max_examples=60, stateful_step_count=50, deadline=None, database=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
test_kvcache_against_its_model = CacheMachine.TestCase

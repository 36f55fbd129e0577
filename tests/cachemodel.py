"""A KVCache under test beside a model of what it must hold, shared by the property-based fuzzer
(tests/test_fuzz.py) and the long soak (scripts/soak.py).

Each operation runs on the cache and compares the outcome with the model: which slots are in use,
each one's stepped length, the tokens written (after every operation each request writes
everything below ``mapped_tokens``: that is the contract, so anything the cache takes back too
early shows as lost data), whether a step must succeed (its growth against free pages, budget
headroom and reclaimable pages). ``check()`` then compares everything with reality:
the books against /proc/self/maps and the memfd (``books.check_cache``) and every written token.
A fault can be injected at any driver call of any operation.

Prefix sharing (issue 14): ``fork`` and ``alloc`` with a prompt from one of a few families (two
prompts of a family share their leading tokens). The token pattern written at a position of a
prompt depends only on the family, as a model's KV depends only on the tokens, so whatever
prefix the cache reuses, and from whichever slot, the check sees the family's pattern there; a
slot's ``plan`` says which tag each position holds (a fork inherits its source's plan below the
fork point).
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import torch

from books import check_cache
from faults import EXPECTED, HOST_DRIVER_CALLS, Injector, libc_fails_like_the_os
from kvdata import check, write
from pyvattn import KVCache, OutOfPages, OutOfSlots
from pyvattn._ffi import libc

TOKENS_PER_PAGE = 16
FAMILY_TAG = 10_000  # the tag of family f's prompt tokens is FAMILY_TAG + f


MAX_LEN, SLOTS = 128, 4


def small_cache(deferred_reclaim: bool = True, budget_pages: int = 24) -> KVCache:
    """2 layers (4 regions), 4 slots of 128 tokens (8 pages of 16 tokens), and a budget of 6
    pages per region: reclaim is frequent."""
    return KVCache(2, 1, 64, SLOTS, MAX_LEN, torch.float32, device="cpu", page_size=4096,
                   backend="host", memory_budget=budget_pages * 4096, deferred_reclaim=deferred_reclaim)


def prompt(family: int, length: int) -> np.ndarray:
    """The first ``length`` tokens of prompt family ``family`` (families differ at token 0)."""
    return np.arange(length, dtype=np.int64) * 7 + family * 100_000


class CacheModel:
    def __init__(self, cache: KVCache):
        self.cache = cache
        self.lengths: dict[int, int] = {}  # active slot -> stepped length
        self.written: dict[int, tuple[int, int]] = {}  # active slot -> (tag, tokens written)
        self.plans: dict[int, list[tuple[int, int, int]]] = {}  # active slot -> [(tag, lo, hi)]
        self.tags = 0
        self.counts: Counter[str] = Counter()  # what was exercised and checked
        self._faulty = False  # a fault is armed: a step's outcome can no longer be predicted

    # --- operations --------------------------------------------------------------------------
    def alloc(self, hint: int, family: int | None = None) -> int | None:
        """A request arrives; with ``family``, its prompt is that family's first ``hint`` tokens
        and the cache may reuse a prefix of it."""
        full = len(self.lengths) == self.cache.max_batch_size
        tokens = None if family is None else prompt(family, hint)
        try:
            slot = self.cache.alloc_slot(seq_len=hint, tokens=tokens)
        except OutOfSlots:
            assert full
            self.counts["OutOfSlots"] += 1
            return None
        assert not full and slot not in self.lengths
        self.tags += 1
        cached = self.cache.cached_tokens(slot)
        plan = [(self.tags, 0, MAX_LEN)]
        if tokens is not None:
            tpp = self.cache.page_size // self.cache.token_bytes
            assert cached % tpp == 0 and cached <= max(hint - 1, 0), "reused: whole pages, not the last token"
            plan = [(FAMILY_TAG + family, 0, hint), (self.tags, hint, MAX_LEN)]
            self.counts["prefix hit" if cached else "prefix miss"] += 1
        else:
            assert cached == 0
        assert self.cache.seq_len(slot) == cached
        self.lengths[slot], self.written[slot], self.plans[slot] = cached, (self.tags, cached), plan
        self.counts["alloc"] += 1
        self.write_all()
        return slot

    def fork(self, src: int, num_tokens: int) -> None:
        free = self.cache.max_batch_size - len(self.lengths)
        num_tokens = min(num_tokens, self.lengths[src])
        try:
            slot = self.cache.fork(src, num_tokens)
        except OutOfSlots:
            assert not free
            self.counts["OutOfSlots"] += 1
            return
        except OutOfPages:  # the copied last page: the model does not predict it
            assert set(np.flatnonzero(self.cache._slots.active).tolist()) == set(self.lengths)
            self.counts["fork OutOfPages"] += 1
            return
        assert free and slot not in self.lengths
        assert self.cache.seq_len(slot) == num_tokens == self.cache.cached_tokens(slot)
        self.tags += 1
        plan = [(t, lo, min(hi, num_tokens)) for t, lo, hi in self.plans[src] if lo < num_tokens]
        self.plans[slot] = plan + [(self.tags, num_tokens, MAX_LEN)]
        self.lengths[slot], self.written[slot] = num_tokens, (self.tags, num_tokens)
        self.counts["fork"] += 1
        self.write_all()

    def step(self, lens: dict[int, int], form: str = "dict", background: bool = False) -> bool:
        """Step ``lens`` (a subset of the active slots) given as ``form`` (dict, tensor, ndarray,
        list); with ``background``, through ``step_async`` and a later call. False if the cache
        refused for want of pages."""
        expect_ok = self._fits(lens)
        arg = lens
        if form != "dict":
            vec = np.zeros(self.cache.max_batch_size, dtype=np.int32)
            vec[list(lens)] = list(lens.values())
            arg = {"tensor": torch.from_numpy(vec), "ndarray": vec, "list": vec.tolist()}[form]
        try:
            if background:
                self.cache.step_async(arg)
                self.cache.stats()  # waits, and raises the background error
            else:
                self.cache.step(arg)
        except OutOfPages:
            assert expect_ok in (False, None), "a step the model says fits raised OutOfPages"
            self.counts["OutOfPages"] += 1
            return False
        assert expect_ok in (True, None), "a step the model says cannot fit succeeded"
        for slot, n in lens.items():
            self.lengths[slot] = max(self.lengths[slot], n)
            assert self.cache.seq_len(slot) == self.lengths[slot]
        self.counts["step async" if background else f"step {form}"] += 1
        self.write_all()
        return True

    def write_all(self) -> None:
        for slot in self.written:
            self.write(slot)

    def write(self, slot: int) -> None:
        """Write every token the contract makes safe: ``[written, mapped_tokens)``."""
        tag, done = self.written[slot]
        safe = self.cache.mapped_tokens(slot)
        assert safe >= self.lengths[slot]
        if safe > done:
            for t, lo, hi in self.plans[slot]:
                if max(lo, done) < min(hi, safe):
                    write(self.cache, slot, t, max(lo, done), min(hi, safe))
            self.written[slot] = (tag, safe)
            self.counts["tokens written"] += safe - done

    def free(self, slot: int) -> None:
        del self.lengths[slot], self.written[slot], self.plans[slot]  # freed even if returning its pages fails
        self.cache.free_slot(slot)
        self.counts["free"] += 1

    def trim(self) -> None:
        self.cache.trim()
        self.counts["trim"] += 1

    def reserve(self, pages: int) -> None:
        pool = self.cache.pool
        expect_ok = pages - pool.total_pages <= pool.headroom
        try:
            self.cache.reserve(pages * self.cache.page_size)
        except OutOfPages:
            assert not expect_ok
            self.counts["reserve refused"] += 1
            return
        assert expect_ok
        self.counts["reserve"] += 1

    def with_fault(self, at: int, enomem: bool, op, *args) -> None:
        """Run ``op(*args)`` with its ``at``-th libc call failing (ENOMEM, or KeyboardInterrupt)."""
        injector = Injector(at, fail=libc_fails_like_the_os if enomem else None)
        saved = {name: getattr(libc, name) for name in HOST_DRIVER_CALLS}
        for name in HOST_DRIVER_CALLS:
            setattr(libc, name, injector.wrap(name, saved[name]))
        self._faulty = True
        try:
            op(*args)
        except EXPECTED:
            self.counts["faults raised"] += 1
        finally:
            self._faulty = False
            for name, fn in saved.items():
                setattr(libc, name, fn)
        self.counts["faults injected"] += injector.fired > 0

    # --- the model's expectation ---------------------------------------------------------------
    def _fits(self, lens: dict[int, int]) -> bool | None:
        """Whether the step must succeed (None: the model cannot tell, after a fault left work)."""
        c, slabs = self.cache, self.cache._slabs
        if self._faulty or (slabs.extent > slabs.held).any():
            return None
        need = {s: slabs.pages_for(max(n, self.lengths[s])) for s, n in lens.items()}
        growth = sum(max(0, p - int(slabs.held[s])) for s, p in need.items()) * c.num_regions
        keep = {s: slabs.pages_for(n) for s, n in self.lengths.items()}
        for s, p in need.items():
            keep[s] = max(keep[s], p)
        # (a budget lowered under what exists makes the headroom negative: a step that maps
        # nothing still fits)
        return growth == 0 or growth <= c.pool.free_pages + c.pool.headroom + self._freeable(keep)

    def _freeable(self, keep: dict[int, int]) -> int:
        """Pages that reclaiming everything beyond ``keep`` frees: a page (shared or not) comes
        free when every VA it is mapped at is given back (from the backend's books, all regions)."""
        c, slabs = self.cache, self.cache._slabs
        given = set()
        for s in range(c.max_batch_size):
            lo, hi = keep.get(s, 0), int(slabs.held[s])
            if hi > lo:
                given.update(slabs.vas(np.array([s]), np.array([lo]), np.array([hi])).tolist())
        at: dict[int, list[int]] = {}
        for va, h in c.backend.books()["mapped"].items():
            at.setdefault(h, []).append(va)
        return sum(all(va in given for va in vas) for vas in at.values())

    # --- the comparison with reality ------------------------------------------------------------
    def check(self) -> None:
        check_cache(self.cache)
        active = self.cache._slots.active
        assert set(np.flatnonzero(active).tolist()) == set(self.lengths)
        for slot, (_, n) in self.written.items():
            assert self.cache.seq_len(slot) == self.lengths[slot]
            for t, lo, hi in self.plans[slot]:
                if lo < min(hi, n):
                    check(self.cache, slot, t, min(hi, n), lo)
            self.counts["tokens checked"] += n
        self.counts["checks"] += 1

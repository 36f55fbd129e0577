"""Elastic memory: what a new request can still get, a budget changed at run time, sleep and wake.

:class:`ElasticMemory` is the public side (``KVCache`` inherits it); it holds the cache's lock and
calls the functions here, which read and change the cache's books only through its parts
(``SlotTable``, ``Slabs``, ``PagePool``) and its own ``_supply``/``_reclaim``, so what they say
matches what ``step`` then does.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from ..errors import BudgetTooSmall
from ..units import parse_size


class ElasticMemory:
    """``KVCache``'s methods that give memory back and take it again (issue 15). A cache's tensors
    keep their addresses through all of them."""

    def free_tokens(self) -> int:
        """Tokens a new request could still get mapped: ``alloc_slot`` then a ``step`` to at most
        this many succeeds (``can_admit``). Counts free pool pages, budget headroom and every page
        held beyond what running requests need, in whole pages of every region; 0 when no slot is
        free. A snapshot: other threads, and other caches on a shared budget, move it; the device
        itself may still refuse pages the budget allows (``OutOfPages`` from the step)."""
        with self._lock:
            self._ready()
            return int(self._slabs.tokens_in(admissible_pages(self)))

    def can_admit(self, seq_len: int) -> bool:
        """Whether a new request of ``seq_len`` tokens fits now: True means ``slot =
        alloc_slot(seq_len)`` and ``step({slot: seq_len})`` succeed (as ``free_tokens`` says)."""
        with self._lock:
            self._ready()
            if isinstance(seq_len, (bool, np.bool_)) or not isinstance(seq_len, (int, np.integer)) \
                    or not 0 <= seq_len <= self.max_seq_len:
                raise ValueError(f"seq_len={seq_len!r} must lie in [0, max_seq_len={self.max_seq_len}]")
            return not self._slots.active.all() and \
                int(self._slabs.pages_for(int(seq_len))) <= admissible_pages(self)

    def set_memory_budget(self, size: int | str | None, when_free: bool = False) -> None:
        """Change the cache's own memory budget (bytes, ``"8GiB"``, or None for none) while it runs.
        Growing takes effect at once. Shrinking releases free pool pages, then retained pages
        (finished requests' first), until the pages that exist fit. If running requests hold more
        than ``size``: ``BudgetTooSmall`` and nothing changes; with ``when_free=True`` the budget
        holds at once for growth and what is over it is released as requests finish. A shared
        budget given as ``memory_budget=`` is changed with its own ``set_limit``; both apply."""
        if not isinstance(when_free, (bool, np.bool_)):
            raise ValueError(f"when_free={when_free!r} must be True or False")
        budget = None if size is None else parse_size(size, "size")
        if budget is not None and budget < 0:
            raise ValueError(f"size={size!r} must be >= 0")
        with self._lock:
            self._ready(asleep_ok=True)
            set_budget(self, None if budget is None else budget // self.page_size, bool(when_free))
            self._after_change()

    def sleep(self, keep: bool = False) -> None:
        """Release every physical page (mapped, retained and pooled) back to the device or OS;
        ``k``/``v`` keep their addresses (and CUDA graphs captured over them stay valid). With
        ``keep=True`` the running requests' KV (their ``mapped_tokens``) is first copied to host
        memory (pinned on a GPU) and ``wake`` restores it; without, no slot may be allocated
        (``ValueError``). Until ``wake()`` every other call but ``stats``, ``seq_len``,
        ``set_memory_budget`` and ``close`` raises ``CacheAsleep``; the tensors' memory is unmapped
        meanwhile (touching it is the same fault as an unmapped token). If releasing fails
        part-way the cache is asleep with what was released gone: ``sleep()`` again finishes it."""
        if not isinstance(keep, (bool, np.bool_)):
            raise ValueError(f"keep={keep!r} must be True or False")
        with self._lock:
            self._ready(asleep_ok=True)
            if self._asleep is None:
                running = np.flatnonzero(self._slots.active)
                if len(running) and not keep:
                    raise ValueError(f"sleep(keep=False) would drop the KV of the requests in slots "
                                     f"{running[:8].tolist()}: free_slot() them first, or sleep(keep=True)")
                self._asleep = SavedKV.save(self, running)
            release_everything(self)
            self._after_change()

    def wake(self) -> None:
        """Make a sleeping cache usable again: map what the kept requests need (``OutOfPages``, still
        asleep and nothing mapped, if the budget or device no longer has it) and copy their KV
        back; everything else maps on demand as before. A cache that is awake: nothing to do."""
        with self._lock:
            self._ready(asleep_ok=True)
            if self._asleep is None:
                return
            restore_pages(self, self._asleep)
            self._asleep = None
            self._after_change()

    @property
    def asleep(self) -> bool:
        """Whether ``sleep()`` released the cache's memory and ``wake()`` has not yet run."""
        return self._asleep is not None


def admissible_pages(cache) -> int:
    """Pages (per region) the slot ``alloc_slot`` gives a new request can hold after its first step:
    free pool pages, budget headroom, pages a failed call left to be unmapped, and every page
    held beyond what running requests need (the same counts ``step`` reclaims from), shared out
    over the regions; or the pages a free slot already holds, if more. 0 when no slot is free.

    A free slot's own pages are among the reclaimable ones, so every free slot reaches the same
    number: that is why the slot ``alloc_slot`` picks need not be known here."""
    slots, slabs, pool = cache._slots, cache._slabs, cache.pool
    free = ~slots.active
    if not free.any():
        return 0
    keep = np.where(slots.active, slabs.pages_for(slots.lengths), 0)
    strays = int(slabs.mapped(slots.every).sum()) - int(slabs.held.sum()) * cache.num_regions
    plan = cache._reclaim_plan()
    # over a budget lowered with when_free, headroom is negative: what is reclaimable pays that first
    shared = max(0, (pool.free_pages + pool.headroom + strays + plan.reclaimable(keep)) // cache.num_regions)
    if plan.pages is not None:  # a free slot drops pages it shares before a new request writes there
        return int(min(cache.pages_per_slot, shared))
    return int(min(cache.pages_per_slot, max(shared, int(slabs.held[free].max()))))


def needed_pages(cache) -> int:
    """Pages (all regions) the running requests' stepped lengths need: what no budget can take."""
    slots, slabs = cache._slots, cache._slabs
    return int(slabs.pages_for(slots.lengths[slots.active]).sum()) * cache.num_regions


def set_budget(cache, pages: int | None, when_free: bool) -> None:
    """Make ``pages`` the cache's own budget (``None``: none). Lowering it releases free pool pages,
    then reclaims retained pages, until the pages that exist fit. If the running requests need
    more than ``pages``: ``BudgetTooSmall`` having changed nothing, or with ``when_free`` the new
    budget holds at once for growth and the rest is released as requests finish
    (:func:`enforce_budget`)."""
    cache._stats.unmapped(cache._slabs.settle())
    if pages is not None and needed_pages(cache) > pages and not when_free:
        P = cache.page_size
        raise BudgetTooSmall(
            f"memory_budget={pages * P} bytes is less than the running requests hold ({needed_pages(cache) * P} "
            f"bytes): free some first, or pass when_free=True to shrink as they finish",
            needed=needed_pages(cache) * P, available=pages * P)
    if when_free:
        cache.pool.budget_pages = pages
    if pages is not None:
        release_over(cache, pages)
    cache.pool.budget_pages = pages


def enforce_budget(cache) -> None:
    """Release what the pool holds over a budget lowered with ``when_free`` (after a request
    finished or a step reclaimed): free pool pages, then retained pages."""
    budget = cache.pool.budget_pages
    if budget is not None and cache.pool.total_pages > budget:
        release_over(cache, budget)


def release_over(cache, pages: int) -> None:
    """Release pages until at most ``pages`` exist or only needed ones are left: free pool pages
    first, then retained pages (finished requests' first, as ``step`` reclaims them)."""
    pool, slabs, slots = cache.pool, cache._slabs, cache._slots
    pool.adopt_orphans()
    over = pool.total_pages - pages
    if over <= 0:
        return
    over -= pool.trim(max(0, pool.free_pages - over))
    if over > 0:
        keep = np.where(slots.active, slabs.pages_for(slots.lengths), 0)
        cache._reclaim(cache._reclaim_plan().plan(over, keep))
        pool.trim(max(0, pool.free_pages - over))


def release_everything(cache) -> None:
    """Unmap every page of every slot and release every physical page (sleep)."""
    slabs, pool = cache._slabs, cache.pool
    cache._stats.unmapped(slabs.settle())
    holding = np.flatnonzero(slabs.extent > 0)
    cache._stats.unmapped(slabs.shrink(holding, np.zeros(len(holding), np.int64)))
    pool.adopt_orphans()
    pool.trim(0)


def restore_pages(cache, saved: "SavedKV") -> None:
    """Map again what the requests ``saved`` holds need (all or nothing), then copy their KV back.
    The cache's own budget lets running requests have what they need even when it was lowered
    under that with ``when_free`` (they held it before sleeping); a shared budget may refuse."""
    slots, slabs, pool = cache._slots, cache._slabs, cache.pool
    cache._stats.unmapped(slabs.settle())
    need = slabs.pages_for(slots.lengths[saved.slots])
    keep = np.where(slots.active, slabs.pages_for(slots.lengths), 0)
    growing = need > slabs.held[saved.slots]
    if growing.any():
        budget = pool.budget_pages
        if budget is not None:
            pool.budget_pages = max(budget, needed_pages(cache))
        try:
            t0 = time.perf_counter()
            pages = slabs.grow(saved.slots[growing], need[growing], lambda n, vas: cache._supply(n, vas, keep))
            cache._stats.mapped(pages, time.perf_counter() - t0)
        finally:
            pool.budget_pages = budget
    saved.restore(cache)


class SavedKV:
    """The running requests' KV, copied to host memory by ``sleep(keep=True)`` (pinned memory when
    the cache is on a GPU, so the copies are DMA) and copied back by ``wake``: for every slot in
    ``slots``, tokens ``[0, tokens[i])`` (its ``mapped_tokens``: everything a request may have
    written) of every layer's K and V, in one flat tensor of the cache's dtype."""

    def __init__(self, slots: np.ndarray, tokens: np.ndarray, store: torch.Tensor):
        self.slots, self.tokens, self.store = slots, tokens, store

    @classmethod
    def save(cls, cache, slots: np.ndarray) -> "SavedKV":
        slabs = cache._slabs
        tokens = slabs.tokens_in(slabs.pages_for(cache._slots.lengths[slots]))
        per_token = cache.num_kv_heads * cache.head_dim
        size = int(tokens.sum()) * cache.num_regions * per_token
        store = torch.empty(size, dtype=cache.dtype, pin_memory=cache.device.type == "cuda")
        saved = cls(slots, tokens, store)
        for tensor, chunk in saved._pairs(cache):
            chunk.copy_(tensor, non_blocking=True)
        cache.backend.synchronize()
        return saved

    def restore(self, cache) -> None:
        for tensor, chunk in self._pairs(cache):
            tensor.copy_(chunk, non_blocking=True)
        cache.backend.synchronize()

    def _pairs(self, cache):
        """(slot's tokens in one region's tensor, its chunk of ``store``), region by region."""
        shape = (cache.num_kv_heads, cache.head_dim)
        offset, per_token = 0, cache.num_kv_heads * cache.head_dim
        for layer in range(cache.num_layers):
            for region in (cache.k[layer], cache.v[layer]):
                for slot, n in zip(self.slots.tolist(), self.tokens.tolist()):
                    yield region[slot, :n], self.store[offset:offset + n * per_token].view(n, *shape)
                    offset += n * per_token

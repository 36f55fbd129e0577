"""Elastic memory: what a new request can still get, a budget changed at run time, sleep and wake.

``KVCache.free_tokens``, ``can_admit``, ``set_memory_budget``, ``sleep`` and ``wake`` hold the
cache's lock and call these; they read and change the cache's books only through its parts
(``SlotTable``, ``Slabs``, ``PagePool``) and its own ``_supply``/``_reclaim``, so what they say
matches what ``step`` then does.
"""

from __future__ import annotations

import numpy as np
import torch

from ..errors import BudgetTooSmall
from .reclaim import Reclaim


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
    reclaimable = Reclaim(slabs.held, slots.active, cache.num_regions).reclaimable(keep)
    shared = (pool.free_pages + pool.headroom + strays + reclaimable) // cache.num_regions
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
        cache._reclaim(Reclaim(slabs.held, slots.active, cache.num_regions).plan(over, keep))
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
    """Map again what the requests ``saved`` holds need (all or nothing), then copy their KV back."""
    slots, slabs = cache._slots, cache._slabs
    cache._stats.unmapped(slabs.settle())
    need = slabs.pages_for(slots.lengths[saved.slots])
    keep = np.where(slots.active, slabs.pages_for(slots.lengths), 0)
    growing = need > slabs.held[saved.slots]
    if growing.any():
        pages = slabs.grow(saved.slots[growing], need[growing], lambda n, vas: cache._supply(n, vas, keep))
        cache._stats.mapped(pages, 0.0)
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

    @property
    def nbytes(self) -> int:
        return self.store.numel() * self.store.element_size()

    def _pairs(self, cache):
        """(slot's tokens in one region's tensor, its chunk of ``store``), region by region."""
        shape = (cache.num_kv_heads, cache.head_dim)
        offset, per_token = 0, cache.num_kv_heads * cache.head_dim
        for layer in range(cache.num_layers):
            for region in (cache.k[layer], cache.v[layer]):
                for slot, n in zip(self.slots.tolist(), self.tokens.tolist()):
                    yield region[slot, :n], self.store[offset:offset + n * per_token].view(n, *shape)
                    offset += n * per_token

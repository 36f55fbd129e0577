"""Slabs: the pages every slot holds in every region of the cache's one reservation."""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from ..backends.base import UNMAPPED
from ..buffer import VirtualBuffer
from ..pool import PagePool


class Slabs:
    """Every slot's slab in every region, and how many pages each holds.

    Layout: region ``r`` (K of layer ``r // 2`` when ``r`` is even, V when odd), slot ``s``, page
    ``i`` is page ``(r * slots + s) * pages_per_slot + i`` of the reservation. A slot holds the same
    pages in every region:

    * ``held[s]``: pages ``[0, held[s])`` are mapped in every region;
    * ``extent[s]``: nothing at or beyond it is mapped. It equals ``held[s]`` unless a call failed
      half-way and left pages mapped beyond ``held`` (the backend's books say which); ``settle``
      unmaps those, and the cache does so before it plans anything;
    * ``capacity[s]``: ``held[s]`` in tokens, kept with it for the step hot path.

    ``grow``/``shrink`` set ``extent`` before the backend call and ``held`` after it, and read the
    backend's books after a failure, so these numbers stay true whatever a call raises.
    """

    def __init__(self, buffer: VirtualBuffer, pool: PagePool, regions: int, slots: int,
                 pages_per_slot: int, token_bytes: int, max_len: int):
        self.buffer, self.pool, self.backend = buffer, pool, buffer.backend
        self.regions, self.slots, self.pages_per_slot = regions, slots, pages_per_slot
        self.page_size, self.token_bytes, self.max_len = buffer.page_size, token_bytes, max_len
        self.held = np.zeros(slots, dtype=np.int64)
        self.extent = np.zeros(slots, dtype=np.int64)
        self.capacity = np.zeros(slots, dtype=np.int64)
        self._region_first = np.arange(regions, dtype=np.int64) * slots * pages_per_slot

    def pages_for(self, tokens):
        """Pages (per region) that ``tokens`` tokens need."""
        return -(-tokens * self.token_bytes // self.page_size)

    def tokens_in(self, pages):
        """Tokens that ``pages`` pages (per region) hold."""
        return np.minimum(self.max_len, pages * self.page_size // self.token_bytes)

    def vas(self, slots: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
        """VAs of pages ``[lo[i], hi[i])`` of slot ``slots[i]`` in every region (region-major)."""
        counts = hi - lo
        if not counts.sum():
            return np.zeros(0, np.int64)
        ends = np.cumsum(counts)
        within = np.repeat(slots * self.pages_per_slot + lo - (ends - counts), counts) + np.arange(ends[-1])
        return self.buffer.vas((self._region_first[:, None] + within[None, :]).ravel())

    def grow(self, slots: np.ndarray, need: np.ndarray, supply: Callable[[int, np.ndarray], list]) -> int:
        """Map pages up to ``need[i]`` under ``slots[i]`` in every region (call ``settle`` first),
        with handles from ``supply(count, vas)``; return how many pages were mapped. All or
        nothing."""
        vas = self.vas(slots, self.held[slots], need)
        handles = supply(len(vas), vas)
        self.extent[slots] = np.maximum(self.extent[slots], need)
        try:
            self.backend.map(vas, handles)
        except BaseException:
            stayed = self.backend.handles_at(vas) != UNMAPPED
            self.pool.give(np.asarray(handles, dtype=np.int64)[~stayed].tolist())
            raise
        self._set_held(slots, need)
        return len(vas)

    def share(self, dst: int, src: int, pages: int) -> int:
        """Map the pages ``[0, pages)`` of ``src`` under ``dst`` too, in every region: the same
        physical pages at two addresses (``dst`` must hold nothing). All or nothing; returns how
        many mappings were made."""
        assert self.extent[dst] == 0 and self.held[src] >= pages
        one, lo, hi = np.array([dst]), np.zeros(1, np.int64), np.array([pages])
        handles = self.backend.handles_at(self.vas(np.array([src]), lo, hi))
        vas = self.vas(one, lo, hi)
        self.extent[dst] = pages
        self.backend.map(vas, handles, share=True)  # all or nothing: on error ``settle`` finds nothing
        self._set_held(one, hi)
        return len(vas)

    def copy(self, dst: int, src: int, lo: int, hi: int) -> None:
        """Copy bytes ``[lo, hi)`` of ``src``'s slab to ``dst``'s, in every region (both mapped)."""
        if hi <= lo:
            return
        slab = self.pages_per_slot * self.page_size
        for r in range(self.regions):
            to = self.buffer.view((r * self.slots + dst) * slab + lo, (hi - lo,), torch.uint8)
            to.copy_(self.buffer.view((r * self.slots + src) * slab + lo, (hi - lo,), torch.uint8))

    def page_table(self) -> np.ndarray:
        """``[slots, pages_per_slot]``: the handle under every page of every slot in region 0
        (``UNMAPPED`` where none); sharing is the same in every region."""
        pages = np.arange(self.slots * self.pages_per_slot, dtype=np.int64)
        return self.buffer.handles(pages).reshape(self.slots, self.pages_per_slot)

    def shared(self, slots: np.ndarray) -> np.ndarray:
        """For each slot: how many of its first pages are mapped under another slot too (sharing
        is always of a prefix, the same pages in every region: region 0 tells)."""
        out = np.zeros(len(slots), dtype=np.int64)
        for i, s in enumerate(slots.tolist()):
            held = int(self.held[s])
            if held:
                refs = self.backend.refs(self.backend.handles_at(self.vas(np.array([s]), np.zeros(1, np.int64),
                                                                          np.array([held]))[:held]))
                out[i] = held - int(np.argmax(refs[::-1] > 1)) if (refs > 1).any() else 0
        return out

    def shrink(self, slots: np.ndarray, keep: np.ndarray) -> int:
        """Unmap every page at or beyond ``keep[i]`` under ``slots[i]`` and give it to the pool;
        return how many pages were unmapped."""
        top = self.extent[slots]
        cut = top > keep
        slots, keep, top = slots[cut], keep[cut], top[cut]
        if not len(slots):
            return 0
        vas = self.vas(slots, keep, top)
        handles = self.backend.handles_at(vas)
        if (top > self.held[slots]).any():  # strays: only what the books say is mapped
            vas, handles = vas[handles != UNMAPPED], handles[handles != UNMAPPED]
        self._set_held(slots, np.minimum(self.held[slots], keep))
        try:
            self.backend.unmap(vas)
        except BaseException:
            self._give_unmapped(handles[self.backend.handles_at(vas) == UNMAPPED])
            raise
        self._give_unmapped(handles)
        self.extent[slots] = keep
        return len(vas)

    def _give_unmapped(self, handles: np.ndarray) -> None:
        """Give the pool those of ``handles`` (just unmapped) that are mapped nowhere now: a page
        shared with another slot goes back only with its last mapping."""
        handles = np.unique(handles)
        self.pool.give(handles[self.backend.refs(handles) == 0].tolist())

    def next_pages(self, count: int) -> np.ndarray:
        """VAs of the ``count`` pages growth will want first: the next page of slot 0 in every
        region, of slot 1, ..., then the page after, and so on (a step grows all regions)."""
        out, page, found = [], int(self.extent.min()), 0
        every = np.arange(self.slots)
        while found < count and page < self.pages_per_slot:
            slots = every[self.extent <= page]
            one = np.full(len(slots), page)
            out.append(self.vas(slots, one, one + 1).reshape(self.regions, -1).T.ravel())
            found += len(out[-1])
            page += 1
        return np.concatenate(out)[:count] if out else np.zeros(0, np.int64)

    def settle(self) -> int:
        """Unmap what a failed call left beyond ``held``; return how many pages that was."""
        strays = np.flatnonzero(self.extent > self.held)
        return self.shrink(strays, self.held[strays]) if len(strays) else 0

    def mapped(self, slots: np.ndarray) -> np.ndarray:
        """Pages (all regions) each slot really has mapped: ``held`` in every region, plus any
        left beyond it by a failed rollback."""
        out = self.held[slots] * self.regions
        for i in np.flatnonzero(self.extent[slots] > self.held[slots]).tolist():
            s = slots[i:i + 1]
            out[i] += int((self.backend.handles_at(self.vas(s, self.held[s], self.extent[s])) != UNMAPPED).sum())
        return out

    def _set_held(self, slots: np.ndarray, pages: np.ndarray) -> None:
        self.held[slots] = pages
        self.capacity[slots] = self.tokens_in(pages)

"""PrefixSharing: which slot a new request gets when prefixes can be shared, and what it inherits."""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from ..backends.base import undo_one
from .prefix import PrefixIndex
from .slabs import Slabs
from .slots import SlotTable
from .stats import CacheStats


class PrefixSharing:
    """Forks and automatic prefix reuse for :class:`pyvattn.KVCache` (its lock held).

    * ``chain(tokens)``: a prompt's block-hash chain (checked), and how many blocks may be reused;
    * ``reuse(chain, usable)``: claim the slot holding the longest prefix, a finished request's in
      place (nothing mapped) or a running request's by ``fork``; None if none holds any;
    * ``pick_free(free, seq_len)``: the slot for a request that reuses nothing (best fit, keeping
      retained prefixes longest, least recently used first);
    * ``claim(slot, keep, chain, cached)``: hand a slot to a new request; pages it may write that
      another slot maps too are taken away first (shared pages are read-only);
    * ``fork(src, num_tokens, chain)``: a fresh slot with ``src``'s whole pages mapped under it and
      the rest of the last page copied; all or nothing.

    ``grow(slots, lens)`` and ``reclaim(plan)`` are the cache's own (mapping from the pool under
    the budget, giving pages back), so a fork grows and reclaims exactly as a step does.
    """

    def __init__(self, slots: SlotTable, slabs: Slabs, index: PrefixIndex, stats: CacheStats,
                 grow: Callable[[np.ndarray, np.ndarray], None], reclaim: Callable[[list], None]):
        self.slots, self.slabs, self.index, self.stats = slots, slabs, index, stats
        self._grow, self._reclaim = grow, reclaim

    def chain(self, tokens) -> tuple[list[bytes], int]:
        """The block-hash chain of ``tokens`` (checked), and how many of its blocks may be reused:
        the last token is always left to compute (its logits start decoding)."""
        if tokens is None:
            return [], 0
        if isinstance(tokens, torch.Tensor):
            tokens = tokens.detach().cpu().numpy()
        arr = np.asarray(tokens)
        if arr.ndim != 1 or (arr.size and arr.dtype.kind not in "iu"):
            raise ValueError(f"tokens: must be a 1-D sequence of integer token ids, got shape {arr.shape} "
                             f"dtype {arr.dtype}")
        if len(arr) > self.slots.max_len:
            raise ValueError(f"tokens: {len(arr)} tokens exceed max_seq_len={self.slots.max_len}")
        chain = self.index.hashes(arr)
        return chain, (max(len(arr) - 1, 0) // self.index.block if self.index.block else 0)

    def reuse(self, chain: list[bytes], usable: int) -> int | None:
        """Claim a slot for a prompt with the longest cached prefix of ``chain[:usable]``: take a
        finished request's slot over in place, or fork a running one. None if nothing matches."""
        match = self.index.longest(chain[:usable], self.held_blocks)
        if match is None:
            return None
        tokens = match.blocks * self.index.block
        if not self.slots.active[match.slot]:
            slot = match.slot
            self.claim(slot, match.blocks, chain, tokens)
        else:
            if self.slabs.backend.max_mappings is not None and (self.slabs.backend.refs(self.slabs.page_table()[
                    match.slot, :match.blocks]) >= self.slabs.backend.max_mappings).any():
                return None  # the driver maps one page at only so many addresses
            slot = self.fork(match.slot, tokens, chain)
        self.stats.prefix_hit(tokens)
        return slot

    def pick_free(self, free: np.ndarray, seq_len: int) -> int:
        """The free slot for a request that reuses no prefix: best fit among those holding no
        findable prefix (ties to the least recently used), else the least recently used."""
        used = self.index.used[free]
        retained = np.fromiter((self.held_blocks(s) > 0 for s in free.tolist()), bool, len(free)) \
            if self.index.any() else np.zeros(len(free), bool)
        if retained.all():
            return int(free[np.argmin(used)])
        free, used = free[~retained], used[~retained]
        held = self.slabs.held[free]
        fits = held >= self.slabs.pages_for(seq_len) if seq_len else np.zeros(len(free), bool)
        order = np.lexsort((used[fits], held[fits])) if fits.any() else np.lexsort((used, -held))
        return int((free[fits] if fits.any() else free)[order[0]])

    def held_blocks(self, slot: int) -> int:
        """Blocks of ``slot``'s prompt chain that it holds written: a running request's up to its
        stepped length, a finished one's up to where it ended, and only while its pages stay."""
        if not self.index.chain(slot):
            return 0
        length = self.slots.lengths[slot] if self.slots.active[slot] else self.index.finished_len[slot]
        return int(min(length // self.index.block, self.slabs.held[slot], len(self.index.chain(slot))))

    def claim(self, slot: int, keep: int, chain: list[bytes], cached: int = 0) -> None:
        """Give ``slot`` to a new request that may write from page ``keep`` on: pages from there
        that another slot maps too are taken away first (they are read-only), then the slot is
        marked in use, stepped to ``cached`` tokens (present, so never reclaimed)."""
        if self.slabs.shared(np.array([slot]))[0] > keep:
            self.stats.unmapped(self.slabs.settle())
            self._reclaim([(slot, int(self.slabs.extent[slot]) - keep)])
        self.slots.claim(slot)
        self.slots.record(np.array([slot]), np.array([cached]))
        self.index.assign(slot, chain, cached)

    def fork(self, src: int, num_tokens: int, chain: list[bytes]) -> int:
        """``fork`` (checked): a fresh slab for the new slot, ``src``'s whole pages mapped under
        it, the rest of the last page mapped and copied; all or nothing."""
        free = np.flatnonzero(~self.slots.active)
        dst = int(free[np.lexsort((self.index.used[free], self.slabs.held[free]))[0]])
        whole = num_tokens * self.slabs.token_bytes // self.slabs.page_size
        self.claim(dst, 0, chain, 0)
        try:
            self.stats.unmapped(self.slabs.settle())
            self._reclaim([(dst, int(self.slabs.extent[dst]))])  # a fresh slab: its old pages go
            self.stats.shared(self.slabs.share(dst, src, whole))
            one = np.array([dst])
            self._grow(one, np.array([num_tokens]))
            self.slabs.copy(dst, src, whole * self.slabs.page_size, num_tokens * self.slabs.token_bytes)
            self.slots.record(one, np.array([num_tokens]))
            self.index.cached[dst] = num_tokens
        except BaseException as exc:
            raise undo_one(exc, self._drop, dst)
        self.stats.forks += 1
        return dst

    def _drop(self, slot: int) -> None:
        """Take back a slot claimed by a call that failed: free, and holding nothing."""
        self.index.forget(slot)
        self.slots.release(slot)
        self._reclaim([(slot, int(self.slabs.extent[slot]))])

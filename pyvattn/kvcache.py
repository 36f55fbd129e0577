"""KVCache: vAttention's KV-cache manager.

Every layer's K and V is one tensor ``[max_batch_size, max_seq_len, num_kv_heads, head_dim]`` in
contiguous virtual memory (flash-attn's cache layout). Request slot ``b`` owns the slab
``[b, :, :, :]`` of every layer; physical pages are mapped under a slab as the request grows, so an
unmodified attention kernel reads the cache with no block table.
"""

from __future__ import annotations

import os
import threading
import warnings
import weakref
from typing import Mapping, Sequence

import numpy as np
import torch

from . import backends
from .backends.base import undo_one
from .budget import Budget
from .buffer import VirtualBuffer
from .core import elastic
from .core.elastic import ElasticMemory
from .core.growth import MappingEngine
from .core.layout import Layout
from .core.mapper import BackgroundMapper
from .core.prefix import PrefixIndex
from .core.sharing import PrefixSharing
from .core.slabs import Slabs
from .core.slots import SlotTable
from .core.stats import CacheStats
from .errors import CacheAsleep, DriverError, OutOfPages, OutOfSlots
from .pool import PagePool
from .units import parse_size

SeqLens = Mapping[int, int] | Sequence[int] | np.ndarray | torch.Tensor


class KVCache(ElasticMemory, MappingEngine):
    """KV tensors for ``max_batch_size`` request slots, growing page by page as requests grow.

    Lifecycle of a request: ``slot = alloc_slot()``; before every forward pass ``step({slot: n})``
    (``n`` = tokens the pass will have written when it is done); ``free_slot(slot)`` when finished.

    Guarantees:

    * **what is safe**: Tokens ``[0, mapped_tokens(slot))`` of an allocated slot, its stepped
      length rounded up to whole pages, are safe to write and read until ``free_slot(slot)``;
      pages the slot holds beyond them may be reclaimed by any step. (They are mapped and stay
      mapped, unaliased, whatever other slots do; pages beyond them are left by a longer request
      that used the slot before.)
    * **prefix sharing** (``fork``, ``alloc_slot(tokens=...)``): tokens below ``cached_tokens(slot)``
      may lie in pages mapped under other slots too; they are read-only (see ``fork``);
    * ``step`` either maps everything asked for or raises (``OutOfPages``, ``ValueError``) having
      changed nothing another request can observe, and the same holds when any call under it
      raises, ``KeyboardInterrupt`` included;
    * ``step_async`` runs the same mapping on a background thread; the next call into the cache
      waits for it, and the next call from the thread that asked raises its error, if any;
    * any thread may call any method: a lock serializes them (about 0.15 µs per call); a forked
      child cannot use a cache it inherited (and releases nothing of it: the memory is shared);
    * ``close()`` (or leaving a ``with`` block) unmaps and releases every page and the reservation.
      Tensors kept from ``k``/``v`` keep the range reserved and inaccessible until they die: using
      one faults, it never reaches another cache's memory.

    On the host an unmapped token reads as zero (printing a tensor is safe) and writing it faults;
    on a GPU touching one is an illegal-address fault.

    Elastic memory (``free_tokens``, ``can_admit``, ``set_memory_budget``, ``sleep``, ``wake``):
    see :class:`pyvattn.core.elastic.ElasticMemory`.
    """

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, max_batch_size: int,
                 max_seq_len: int, dtype: torch.dtype = torch.float16,
                 device: str | torch.device = "cpu", page_size: int | str = "auto",
                 backend: str = "auto", memory_budget: int | str | Budget | None = None,
                 deferred_reclaim: bool = True):
        if not isinstance(deferred_reclaim, (bool, np.bool_)):
            raise ValueError(f"deferred_reclaim={deferred_reclaim!r} must be True or False")
        self.deferred_reclaim = bool(deferred_reclaim)
        try:
            self.device = torch.device(device)
        except (RuntimeError, TypeError) as exc:
            raise ValueError(f"device={device!r} is not a device: {exc}") from None
        self.selection = backends.select(backend, self.device)
        shared = memory_budget if isinstance(memory_budget, Budget) else None
        layout = Layout.of(self.selection.cls, self.device, num_layers, num_kv_heads, head_dim,
                           max_batch_size, max_seq_len, dtype, page_size, None if shared else memory_budget)
        self.__dict__.update(layout.as_dict())  # num_layers, ..., page_size, token_bytes, slot_bytes

        self._lock = threading.Lock()
        self._closed = True  # until everything below exists
        self._forked = False
        self._asleep: elastic.SavedKV | None = None  # what sleep() kept, while asleep
        self._account = None
        self.backend = self.selection.cls(self.device, self.page_size)
        try:
            if shared is not None:  # one account per cache: the pool charges it for every page
                self._account = shared.open_account(f"KVCache {num_layers}x{num_kv_heads}x{head_dim} "
                                                    f"batch={max_batch_size} seq={max_seq_len}"[:64])
            layout.check_mapping_room(self.backend, self.selection.name)
            try:
                self.buffer = VirtualBuffer(self.backend, layout.reservation_bytes)
            except (DriverError, OutOfPages) as exc:
                raise layout.reservation_error(exc) from exc
            self.pool = PagePool(self.backend, self.budget_pages, grow_pages=self.num_regions * 4,
                                 account=self._account)
            self._slots = SlotTable(self.max_batch_size, self.max_seq_len)
            self._slabs = Slabs(self.buffer, self.pool, self.num_regions, self.max_batch_size,
                                self.pages_per_slot, self.token_bytes, self.max_seq_len)
            self._stats = CacheStats()
            whole = self.page_size % self.token_bytes == 0
            self._prefix = PrefixIndex(self.max_batch_size, self.page_size // self.token_bytes if whole else 0)
            self._sharing = PrefixSharing(self._slots, self._slabs, self._prefix, self._stats, self._grow,
                                          self._reclaim)
            self._mapper = BackgroundMapper()
            views = [layout.region_view(self.buffer, r) for r in range(self.num_regions)]
        except BaseException as exc:
            raise undo_one(exc, self._release_everything)
        self.k: list[torch.Tensor] = views[0::2]
        self.v: list[torch.Tensor] = views[1::2]
        self._closed = False
        _caches.add(self)

    # --- request slots -----------------------------------------------------------------------
    def alloc_slot(self, seq_len: int = 0, tokens=None) -> int:
        """Claim a free slot. Prefers a slot whose pages are still mapped from an earlier request:
        the smallest one that already covers ``seq_len`` tokens (best fit), else the one with the
        most pages mapped; a slot holding a prefix that ``tokens`` can find is taken last, the
        least recently used first. Raises ``OutOfSlots`` when all ``max_batch_size`` slots are in use.

        With ``tokens`` (the prompt's token ids), the longest prefix of it that another slot holds
        in whole pages is reused (see README, "Prefix sharing"): a finished request's slot that
        still holds it is taken over in place (nothing mapped), a running request's pages are
        shared (``fork``). ``cached_tokens(slot)`` says how many prompt tokens are present (at
        least the last one is always left to compute): prefill starts there."""
        with self._lock:
            self._ready()
            if isinstance(seq_len, (bool, np.bool_)) or not isinstance(seq_len, (int, np.integer)) \
                    or not 0 <= seq_len <= self.max_seq_len:
                raise ValueError(f"seq_len={seq_len!r} must lie in [0, max_seq_len={self.max_seq_len}]")
            chain, usable = self._sharing.chain(tokens)
            free = np.flatnonzero(~self._slots.active)
            if not len(free):
                raise OutOfSlots(f"all {self.max_batch_size} slots are in use (max_batch_size)")
            if tokens is not None:
                self._stats.prefix_queries += 1
                slot = self._sharing.reuse(chain, usable)
                if slot is not None:
                    return slot
                seq_len = max(int(seq_len), len(tokens))
            slot = self._sharing.pick_free(free, seq_len)
            self._sharing.claim(slot, 0, chain)
            return slot
            return slot

    def fork(self, src_slot: int, num_tokens: int) -> int:
        """A new slot whose first ``num_tokens`` tokens are ``src_slot``'s (at most its stepped
        length). Every page wholly inside them is the same physical page mapped under both slabs,
        in every layer's K and V (no copy); the rest of the last page is copied into a page of the
        new slot. The new slot starts stepped to ``num_tokens``.

        Contract: the shared pages are read-only for both slots (``cached_tokens``/``mapped_tokens``
        say where each may write: ``step`` never asks a slot to write below its length, and every
        token a slot appends lands at or past ``num_tokens``, in pages of its own). Writing a
        shared token changes it for every slot that maps it. Raises ``OutOfSlots``,
        ``OutOfPages`` (the copied page), ``ValueError``; on any error nothing changed."""
        with self._lock:
            self._ready()
            src = self._slots.check_slot(src_slot, "src_slot")
            if not self._slots.active[src]:
                raise ValueError(f"src_slot={src} is not allocated")
            length = int(self._slots.lengths[src])
            if isinstance(num_tokens, (bool, np.bool_)) or not isinstance(num_tokens, (int, np.integer)) \
                    or not 0 <= num_tokens <= length:
                raise ValueError(f"num_tokens={num_tokens!r} must lie in [0, seq_len(src_slot)={length}]")
            if not (~self._slots.active).any():
                raise OutOfSlots(f"all {self.max_batch_size} slots are in use (max_batch_size)")
            chain = self._prefix.chain(src)[:int(num_tokens) // self._prefix.block] if self._prefix.block else []
            return self._sharing.fork(src, int(num_tokens), chain)

    def cached_tokens(self, slot: int) -> int:
        """Prompt tokens that were already present when ``slot`` was claimed (a reused prefix, or a
        fork's tokens): prefill starts there, and tokens below it must not be written. 0 for a
        free slot."""
        with self._lock:
            self._ready()
            slot = self._slots.check_slot(slot)
            return int(self._prefix.cached[slot]) if self._slots.active[slot] else 0

    def free_slot(self, slot: int, written: int | None = None) -> None:
        """Finish the request in ``slot``. Its pages stay mapped for the next request that takes
        the slot (deferred reclaim) and are reclaimed only when the pool runs dry; with
        ``deferred_reclaim=False`` they return to the pool at once.

        ``written``: how many of its tokens the request really wrote (default: its stepped
        length). Only those stay findable as a prefix (``alloc_slot(tokens=...)``): an engine
        whose forward pass failed after ``step`` frees with what it wrote before that pass."""
        with self._lock:
            self._ready()
            slot = self._slots.check_slot(slot)
            if not self._slots.active[slot]:
                raise ValueError(f"slot={slot} is not allocated (double free?)")
            length = int(self._slots.lengths[slot])
            if written is not None:
                if isinstance(written, (bool, np.bool_)) or not isinstance(written, (int, np.integer)) \
                        or not 0 <= written:
                    raise ValueError(f"written={written!r} must be an integer >= 0")
                length = min(length, int(written))
            self._prefix.finished(slot, length)
            self._slots.release(slot)
            if not self.deferred_reclaim:
                self._reclaim([(slot, int(self._slabs.extent[slot]))])
            self._after_change()

    # --- growth ------------------------------------------------------------------------------
    def step(self, seq_lens: SeqLens) -> None:
        """Map every page the next forward pass needs: for each slot, tokens ``[0, seq_lens[slot])``
        in every layer's K and V. ``seq_lens`` is a mapping ``{slot: length}`` or a sequence /
        tensor of length ``max_batch_size`` indexed by slot (0 for unused slots). All maps go to
        the backend as one batch. Raises ``OutOfPages`` before mapping anything if the pages
        cannot all be had. A step that maps nothing only records the lengths (microseconds)."""
        with self._lock:
            self._ready()
            slots, lens, grows = self._slots.parse(seq_lens, self._slabs.capacity)
            if grows:
                self._grow(slots, lens)
            self._slots.record(slots, lens)
            if grows:
                self._after_change()

    def step_async(self, seq_lens: SeqLens) -> None:
        """Like ``step`` but on a background thread: call it while the current forward pass runs,
        with the lengths of the *following* step. Input is checked here; mapping errors are raised
        by the next call into the cache. When nothing needs mapping it returns at once, with no
        thread hand-off (waking a thread each decode step costs the caller more than it saves)."""
        with self._lock:
            self._ready()
            slots, lens, grows = self._slots.parse(seq_lens, self._slabs.capacity)
            if grows:
                self._mapper.submit(self._grow_and_record, slots.copy(), lens.copy())
            else:
                self._slots.record(slots, lens)

    def reserve(self, nbytes: int | str) -> int:
        """Create physical pages up front (vAttention's ``reserve_physical_pages``), so later steps
        map without creating; returns the number of pages created. Pages are placed where decode
        growth will want them first (the next page of every slot in every region, and so on)."""
        with self._lock:
            self._ready()
            size = parse_size(nbytes, "nbytes")
            if size < 0:
                raise ValueError(f"nbytes={nbytes!r} must not be negative")
            want = -(-size // self.page_size) - self.pool.total_pages
            return self.pool.reserve(size, self._slabs.next_pages(want) if want > 0 else None)

    def trim(self) -> int:
        """Reclaim every page of every free slot and release all free pool pages to the device;
        returns the number of pages released."""
        with self._lock:
            self._ready()
            self._stats.unmapped(self._slabs.settle())
            free = np.flatnonzero(~self._slots.active & (self._slabs.extent > 0))
            self._reclaim([(s, int(self._slabs.extent[s])) for s in free.tolist()])
            return self.pool.trim(0)

    # --- observability ------------------------------------------------------------------------
    def seq_len(self, slot: int) -> int:
        """The largest length ``slot`` was stepped to since ``alloc_slot`` (a step with a smaller
        length does not shrink it: pages holding written tokens are never reclaimed)."""
        with self._lock:
            self._ready(asleep_ok=True)
            return int(self._slots.lengths[self._slots.check_slot(slot)])

    def mapped_tokens(self, slot: int) -> int:
        """Tokens ``[0, mapped_tokens(slot))`` of an allocated slot, its stepped length rounded up
        to whole pages, are safe to write and read until ``free_slot(slot)``; pages the slot holds
        beyond them may be reclaimed by any step. Returns that number (0 for a free slot);
        ``slot_mapped_bytes`` counts everything mapped under the slot."""
        with self._lock:
            self._ready()
            slot = self._slots.check_slot(slot)
            if not self._slots.active[slot]:
                return 0
            return int(self._slabs.tokens_in(self._slabs.pages_for(self._slots.lengths[slot])))

    def slot_mapped_bytes(self, slot: int) -> int:
        """Bytes mapped under ``slot`` across every layer's K and V."""
        with self._lock:
            self._ready()
            slot = self._slots.check_slot(slot)
            return int(self._slabs.mapped(np.array([slot]))[0]) * self.page_size

    def stats(self) -> dict:
        """Memory and activity counters. Bytes count both K and V of all layers;
        ``mapped_bytes == used_bytes + fragmentation_bytes + retained_bytes``: tokens stepped by
        running requests; the rest of the pages their lengths need (each one's last page);
        everything else mapped (finished requests' slots, pages a reused slot holds beyond its
        length: reclaimable at once). ``waste_bytes`` is the last two together."""
        with self._lock:
            self._ready(asleep_ok=True)
            return {**self._stats.report(self), "asleep": self._asleep is not None}

    # --- lifetime -----------------------------------------------------------------------------
    def close(self) -> None:
        """Unmap and release everything. Idempotent. An error of a pending ``step_async`` is
        dropped here: the cache is going away anyway."""
        with self._lock:
            if self._closed:
                return
            self._mapper.close()  # interrupted: the cache stays open (and whole) for another close()
            self._closed = True
            self._release_everything()

    def _release_everything(self) -> None:
        """Drop the cache's own views, then unmap, release and unreserve everything (a range that
        tensors kept from ``k``/``v`` still view stays reserved and sealed until they die)."""
        self.k, self.v = [], []
        self._asleep = None
        try:
            if getattr(self, "buffer", None) is not None:
                self.buffer.close_views()
            self.backend.close()
        finally:
            if self._account is not None:
                self._account.close()  # gives the shared budget back everything this cache held

    def __enter__(self) -> "KVCache":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        if getattr(self, "_closed", True):
            return
        warnings.warn(f"unclosed {self!r}: close() it or use `with`", ResourceWarning, source=self)
        try:
            self.close()
        except Exception as exc:
            warnings.warn(f"closing {self!r} failed: {exc!r}", ResourceWarning)

    def __repr__(self) -> str:
        return (f"KVCache(layers={self.num_layers}, kv_heads={self.num_kv_heads}, "
                f"head_dim={self.head_dim}, batch={self.max_batch_size}, seq={self.max_seq_len}, "
                f"dtype={self.dtype}, backend={self.selection.name}, page_size={self.page_size})")

    # --- helpers: they run with the lock held, or on the mapper while every caller waits ------
    def _ready(self, asleep_ok: bool = False) -> None:
        """Raise if closed (or asleep, unless ``asleep_ok``); wait for ``step_async``'s mapping and
        raise its error (to the thread that asked for it)."""
        if self._closed:
            raise RuntimeError("this KVCache belongs to the parent process: a forked child must not "
                               "use it (its pages are shared with the parent)" if self._forked
                               else "this KVCache is closed")
        if not self._mapper.idle:
            self._mapper.wait()
        if self._asleep is not None and not asleep_ok:
            raise CacheAsleep("this KVCache is asleep (sleep() released its memory): wake() it first")

    def _after_change(self) -> None:
        """After pages were mapped or given back: release what a budget lowered with ``when_free``
        no longer allows, and tell a shared budget's ledger what the pages do (for ``top``)."""
        elastic.enforce_budget(self)
        if self._account is not None:
            needed = elastic.needed_pages(self)
            self._account.report(used=needed * self.page_size,
                                 retained=(self.buffer.mapped_pages - needed) * self.page_size)

    def _grow_and_record(self, slots: np.ndarray, lens: np.ndarray) -> None:
        self._grow(slots, lens)
        self._slots.record(slots, lens)
        self._after_change()


_caches: weakref.WeakSet[KVCache] = weakref.WeakSet()


def _forget_in_child() -> None:
    """After ``fork()``, in the child: an inherited cache is unusable (its memory is the parent's),
    and nothing of it is released there; a lock held by a thread that did not survive the fork is
    replaced."""
    for cache in list(_caches):
        cache._lock = threading.Lock()
        cache._forked = cache._closed = True


os.register_at_fork(after_in_child=_forget_in_child)

"""KVCache: vAttention's KV-cache manager.

Every layer's K and V is one tensor ``[max_batch_size, max_seq_len, num_kv_heads, head_dim]`` in
contiguous virtual memory (flash-attn's cache layout). Request slot ``b`` owns the slab
``[b, :, :, :]`` of every layer; physical pages are mapped under a slab as the request grows, so an
unmodified attention kernel reads the cache with no block table.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Mapping, Sequence

import numpy as np
import torch

from . import backends
from .buffer import VirtualBuffer
from .errors import OutOfPages, OutOfSlots
from .pool import PagePool
from .units import parse_size

SeqLens = Mapping[int, int] | Sequence[int] | np.ndarray | torch.Tensor


def _positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise ValueError(f"{name}={value!r} must be a positive integer")
    return int(value)


class KVCache:
    """KV tensors for ``max_batch_size`` request slots, growing page by page as requests grow.

    Lifecycle of a request: ``slot = alloc_slot()``; before every forward pass ``step({slot: n})``
    (``n`` = tokens the pass will have written when it is done); ``free_slot(slot)`` when finished.

    Guarantees:

    * data written to a slot below its mapped length is never lost or aliased while the slot is
      allocated, whatever other slots do;
    * ``step`` either maps everything asked for or raises (``OutOfPages``, ``ValueError``) having
      changed nothing another request can observe;
    * ``step_async`` runs the same mapping on a background thread; the next call into the cache
      waits for it and raises its error, if any;
    * ``close()`` (or leaving a ``with`` block) unmaps and releases every page and the reservation;
      the tensors in ``k``/``v`` must not be used afterwards.

    Not thread-safe: one thread drives a cache (``step_async`` is the only concurrency inside).
    """

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, max_batch_size: int,
                 max_seq_len: int, dtype: torch.dtype = torch.float16,
                 device: str | torch.device = "cpu", page_size: int | str = "auto",
                 backend: str = "auto", memory_budget: int | str | None = None,
                 deferred_reclaim: bool = True):
        self.num_layers = _positive_int(num_layers, "num_layers")
        self.num_kv_heads = _positive_int(num_kv_heads, "num_kv_heads")
        self.head_dim = _positive_int(head_dim, "head_dim")
        self.max_batch_size = _positive_int(max_batch_size, "max_batch_size")
        self.max_seq_len = _positive_int(max_seq_len, "max_seq_len")
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise ValueError(f"dtype={dtype!r} must be a floating-point torch.dtype")
        self.dtype = dtype
        try:
            self.device = torch.device(device)
        except (RuntimeError, TypeError) as exc:
            raise ValueError(f"device={device!r} is not a device: {exc}") from None
        self.selection = backends.select(backend, self.device)
        cls = self.selection.cls
        self.page_size = (cls.default_page_size(self.device) if page_size == "auto"
                          else parse_size(page_size, "page_size"))
        cls.check_page_size(self.device, self.page_size)
        self.deferred_reclaim = bool(deferred_reclaim)

        itemsize = torch.empty((), dtype=dtype).element_size()
        self.token_bytes = self.num_kv_heads * self.head_dim * itemsize
        P = self.page_size
        self.pages_per_slot = -(-self.max_seq_len * self.token_bytes // P)
        self.slot_bytes = self.pages_per_slot * P  # a slab starts on a page boundary
        self.num_regions = 2 * self.num_layers  # K and V of every layer
        self._pages_per_region = self.max_batch_size * self.pages_per_slot
        self._region_first_page = np.arange(self.num_regions, dtype=np.int64) * self._pages_per_region

        budget_pages = None
        if memory_budget is not None:
            budget = parse_size(memory_budget, "memory_budget")
            if budget < 0:
                raise ValueError(f"memory_budget={memory_budget!r} must be >= 0")
            budget_pages = budget // P

        self.backend = cls(self.device, P)
        try:
            self.buffer = VirtualBuffer(self.backend, self.num_regions * self._pages_per_region * P)
        except BaseException:
            self.backend.close()
            raise
        self.pool = PagePool(self.backend, budget_pages, grow_pages=self.num_regions * 4)

        shape = (self.max_batch_size, self.max_seq_len, self.num_kv_heads, self.head_dim)
        elem = self.num_kv_heads * self.head_dim
        strides = (self.slot_bytes // itemsize, elem, self.head_dim, 1)
        region_bytes = self._pages_per_region * P
        views = [self.buffer.view(r * region_bytes, shape, dtype, strides) for r in range(self.num_regions)]
        self.k: list[torch.Tensor] = views[0::2]
        self.v: list[torch.Tensor] = views[1::2]

        self._active = np.zeros(self.max_batch_size, dtype=bool)
        self._mapped = np.zeros(self.max_batch_size, dtype=np.int64)  # pages per region, per slot
        self._seq_lens = np.zeros(self.max_batch_size, dtype=np.int64)
        # The decode hot path (nothing to map) must cost microseconds at batch 256, which numpy's
        # per-call overhead does not allow for dict input. So lengths and mapped capacity (tokens)
        # of active slots are also kept in dicts, and "does every length fit, and has none
        # shrunk?" is answered in C-level builtins. Whichever copy of the lengths a step updated
        # is the newer one; the other is refreshed when needed.
        self._capacity: dict[int, int] = {}
        self._capacity_arr = np.zeros(self.max_batch_size, dtype=np.int64)  # 0 for free slots
        self._lens: dict[int, int] = {}
        self._np_stale = False  # _lens is newer than _seq_lens
        self._dict_stale = False  # _seq_lens is newer than _lens
        self._executor: ThreadPoolExecutor | None = None
        self._pending: Future | None = None
        self._worker_ident: int | None = None  # the mapping thread, once step_async started it
        self._closed = False
        self.map_calls = 0
        self.mapped_pages_total = 0
        self.unmapped_pages_total = 0
        self.map_seconds = 0.0
        self.reclaimed_pages_total = 0

    # --- request slots -----------------------------------------------------------------------
    def alloc_slot(self, seq_len: int = 0) -> int:
        """Claim a free slot. Prefers a slot whose pages are still mapped from an earlier request:
        the smallest one that already covers ``seq_len`` tokens (best fit), else the one with the
        most pages mapped. Raises ``OutOfSlots`` when all ``max_batch_size`` slots are in use."""
        self._join()
        if isinstance(seq_len, bool) or not isinstance(seq_len, (int, np.integer)) \
                or not 0 <= seq_len <= self.max_seq_len:
            raise ValueError(f"seq_len={seq_len} must lie in [0, max_seq_len={self.max_seq_len}]")
        free = np.flatnonzero(~self._active)
        if len(free) == 0:
            raise OutOfSlots(f"all {self.max_batch_size} slots are in use (max_batch_size)")
        mapped = self._mapped[free]
        fits = free[mapped >= self._pages_for(seq_len)] if seq_len else free[:0]
        if len(fits):
            slot = fits[np.argmin(self._mapped[fits])]
        else:
            slot = free[np.argmax(mapped)]
        slot = int(slot)
        self._active[slot] = True
        self._seq_lens[slot] = 0
        self._lens[slot] = 0
        self._set_capacity(slot)
        return slot

    def free_slot(self, slot: int) -> None:
        """Finish the request in ``slot``. Its pages stay mapped for the next request that takes
        the slot (deferred reclaim) and are reclaimed only when the pool runs dry; with
        ``deferred_reclaim=False`` they return to the pool at once."""
        self._join()
        self._check_slot(slot, "slot")
        if not self._active[slot]:
            raise ValueError(f"slot={slot} is not allocated (double free?)")
        self._sync_lens()
        self._active[slot] = False
        self._seq_lens[slot] = 0
        self._lens.pop(slot, None)
        del self._capacity[slot]
        self._capacity_arr[slot] = 0
        if not self.deferred_reclaim:
            self._reclaim_slot(slot, int(self._mapped[slot]))

    # --- growth ------------------------------------------------------------------------------
    def step(self, seq_lens: SeqLens) -> None:
        """Map every page the next forward pass needs: for each slot, tokens ``[0, seq_lens[slot])``
        in every layer's K and V. ``seq_lens`` is a mapping ``{slot: length}`` or a sequence /
        tensor of length ``max_batch_size`` indexed by slot (0 for unused slots). All maps go to
        the backend as one batch. Raises ``OutOfPages`` before mapping anything if the pages
        cannot all be had."""
        self._join()
        if self._fits(seq_lens):
            return
        self._apply(*self._parse(seq_lens))

    def _fits(self, seq_lens: SeqLens) -> bool:
        """Fast path: record ``seq_lens`` and return True if nothing needs mapping (and the input
        is plainly valid); False sends the call through full validation."""
        if type(seq_lens) is dict:
            self._refresh_dict()  # no-op unless a tensor-input step came last
            cap, now = self._capacity, self._lens  # active slots only: others raise KeyError
            try:
                ok = all(now[s] <= n <= cap[s] for s, n in seq_lens.items())
            except (KeyError, TypeError):
                return False
            # a float or numpy length or slot id takes the slow path, which validates it
            if ok and type(sum(seq_lens.values())) is int and type(sum(seq_lens)) is int:
                now.update(seq_lens)
                self._np_stale = True
                return True
            return False
        if isinstance(seq_lens, torch.Tensor) and seq_lens.device.type == "cpu":
            seq_lens = seq_lens.numpy()
        if isinstance(seq_lens, np.ndarray) and seq_lens.shape == self._capacity_arr.shape \
                and seq_lens.dtype.kind in "iu":
            self._refresh_numpy()
            # viewed unsigned, a negative length is huge and fails the test; free slots have
            # capacity 0 and length 0, so their entries must be 0
            if ((seq_lens.view(f"u{seq_lens.itemsize}") <= self._capacity_arr).all()
                    and (seq_lens >= self._seq_lens).all()):
                self._seq_lens[:] = seq_lens
                self._dict_stale = True
                return True
        return False

    def step_async(self, seq_lens: SeqLens) -> None:
        """Like ``step`` but on a background thread: call it while the current forward pass runs,
        with the lengths of the *following* step. Input is checked here; mapping errors are raised
        by the next call into the cache. When nothing needs mapping it returns at once, with no
        thread hand-off (waking a thread each decode step costs the caller more than it saves)."""
        self._join()
        if self._fits(seq_lens):
            return
        slots, lens = self._parse(seq_lens)
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pyvattn-map")
        self._pending = self._executor.submit(self._apply_on_worker, slots, lens)

    def _apply_on_worker(self, slots: np.ndarray, lens: np.ndarray) -> None:
        self._worker_ident = threading.get_ident()
        self._apply(slots, lens)

    def reserve(self, nbytes: int | str) -> int:
        """Create physical pages up front (vAttention's ``reserve_physical_pages``), so later steps
        map without creating; returns the number of pages created."""
        self._join()
        size = parse_size(nbytes, "nbytes")
        if size < 0:
            raise ValueError(f"nbytes={nbytes!r} must not be negative")
        return self.pool.reserve(size)

    def _apply(self, slots: np.ndarray, lens: np.ndarray) -> None:
        self._sync_lens()  # reclaim decisions below need every slot's current length
        need = -(-lens * self.token_bytes // self.page_size)
        grow = need - self._mapped[slots]
        growing = grow > 0
        if growing.any():
            self._map_growth(slots[growing], need[growing], slots, need)
        self._seq_lens[slots] = np.maximum(self._seq_lens[slots], lens)  # lengths never shrink
        self._lens.update(zip(slots.tolist(), self._seq_lens[slots].tolist()))  # both current

    def _map_growth(self, slots: np.ndarray, need: np.ndarray, step_slots: np.ndarray,
                    step_need: np.ndarray) -> None:
        first = self._mapped[slots]
        count = int((need - first).sum()) * self.num_regions
        # pages each slot must keep: its last length's, or what this step asks for
        keep = np.where(self._active, self._pages_for(self._seq_lens), 0)
        keep[step_slots] = np.maximum(keep[step_slots], step_need)
        handles = self._take_pages(count, keep)
        # page index = region start + slot * pages_per_slot + page within the slot
        counts = need - first
        run_start = np.repeat(slots * self.pages_per_slot + first - np.cumsum(counts) + counts, counts)
        within = run_start + np.arange(int(counts.sum()))  # slot*pps + first ... need-1, per slot
        pages = (self._region_first_page[:, None] + within[None, :]).ravel()
        t0 = time.perf_counter()
        try:
            self.buffer.map(pages, handles)
        except BaseException:
            self.pool.give(handles)
            raise
        self.map_seconds += time.perf_counter() - t0
        self.map_calls += 1
        self.mapped_pages_total += count
        self._mapped[slots] = need
        for slot in slots.tolist():
            self._set_capacity(slot)

    def _take_pages(self, count: int, keep: np.ndarray) -> list[int]:
        """``count`` pages from the pool, reclaiming mapped pages when the pool and the budget
        cannot supply them: pages of finished requests' slots, then pages an active slot holds
        beyond its current length (left over from a longer request that used the slot before;
        nothing the current request wrote lives there). Checks that enough can be had before
        reclaiming anything, and reclaims only the shortfall (whole pages in every region)."""
        try:
            return self.pool.take(count)
        except OutOfPages as exc:
            short = count - self.pool.free_pages - self.pool.headroom
            if short <= 0:  # the budget allowed it but the device did not: reclaim all we need
                short = count - self.pool.free_pages
            reclaimable = self._reclaimable(keep)
            if short > reclaimable:
                raise OutOfPages(
                    f"step needs {count} pages of {self.page_size} bytes: {self.pool.free_pages} free, "
                    f"{reclaimable} reclaimable (finished requests' pages, and pages a reused slot "
                    f"holds beyond its length), budget/device allows no more ({exc})",
                    needed=count, available=self.pool.free_pages + reclaimable) from None
            self._reclaim(short, keep)
        try:
            return self.pool.take(count)
        except OutOfPages:
            # The budget had room but the device could not create that many pages after all:
            # take the rest from mapped pages too, if they suffice (else the error stands).
            short = count - self.pool.free_pages
            if short > self._reclaimable(keep):
                raise
            self._reclaim(short, keep)
            return self.pool.take(count)

    def _reclaimable(self, keep: np.ndarray) -> int:
        """Pages (all regions) mapped beyond what each slot must keep."""
        return int(np.maximum(self._mapped - keep, 0).sum()) * self.num_regions

    def _reclaim(self, pages: int, keep: np.ndarray) -> None:
        """Return at least ``pages`` mapped pages to the pool (whole pages in every region):
        finished requests' slots first, then active slots' pages beyond ``keep``; most first."""
        excess = np.maximum(self._mapped - keep, 0)
        donors = np.flatnonzero(excess > 0)
        donors = donors[np.lexsort((-excess[donors], self._active[donors]))]
        per_region = -(-pages // self.num_regions)
        for slot in donors.tolist():
            take = min(per_region, int(excess[slot]))
            self._reclaim_slot(slot, take)
            per_region -= take
            if per_region <= 0:
                break

    def _reclaim_slot(self, slot: int, pages: int) -> None:
        """Unmap the last ``pages`` pages of ``slot`` in every region and return them to the pool."""
        if pages <= 0:
            return
        top = int(self._mapped[slot])
        within = slot * self.pages_per_slot + np.arange(top - pages, top)
        handles = self.buffer.unmap((self._region_first_page[:, None] + within[None, :]).ravel())
        self.pool.give(handles)
        self._mapped[slot] = top - pages
        if self._active[slot]:  # a reused slot's excess: its fast-path capacity shrinks too
            self._set_capacity(slot)
        self.unmapped_pages_total += len(handles)
        self.reclaimed_pages_total += len(handles)

    def trim(self) -> int:
        """Reclaim every page of every free slot and release all free pool pages to the device;
        returns the number of pages released."""
        self._join()
        for slot in np.flatnonzero(~self._active & (self._mapped > 0)).tolist():
            self._reclaim_slot(slot, int(self._mapped[slot]))
        return self.pool.trim(0)

    # --- observability ------------------------------------------------------------------------
    def seq_len(self, slot: int) -> int:
        """The largest length ``slot`` was stepped to since ``alloc_slot`` (a step with a smaller
        length does not shrink it: pages holding written tokens are never reclaimed)."""
        self._join()
        self._check_slot(slot, "slot")
        self._sync_lens()
        return int(self._seq_lens[slot])

    def mapped_tokens(self, slot: int) -> int:
        """Tokens of ``slot`` that are backed by memory (a whole number of pages' worth)."""
        self._join()
        self._check_slot(slot, "slot")
        return min(self.max_seq_len, int(self._mapped[slot]) * self.page_size // self.token_bytes)

    def slot_mapped_bytes(self, slot: int) -> int:
        """Bytes mapped for ``slot`` across every layer's K and V."""
        self._join()
        self._check_slot(slot, "slot")
        return int(self._mapped[slot]) * self.page_size * self.num_regions

    def stats(self) -> dict:
        """Memory and activity counters. Bytes count both K and V of all layers."""
        self._join()
        self._sync_lens()
        P = self.page_size
        mapped = self.buffer.mapped_pages * P
        used = int(self._seq_lens[self._active].sum()) * self.token_bytes * self.num_regions
        return {
            **self.backend.describe(),
            "tokens_per_page": P / self.token_bytes,
            "bytes_per_token": self.token_bytes * self.num_regions,
            "reserved_bytes": self.buffer.nbytes,
            "mapped_bytes": mapped,
            "used_bytes": used,
            "waste_bytes": mapped - used,
            "physical_bytes": self.pool.total_pages * P,
            "pool_pages_total": self.pool.total_pages,
            "pool_pages_free": self.pool.free_pages,
            "budget_pages": self.pool.budget_pages,
            "active_slots": int(self._active.sum()),
            "slots_with_mapped_pages": int((self._mapped > 0).sum()),
            "map_calls": self.map_calls,
            "mapped_pages_total": self.mapped_pages_total,
            "unmapped_pages_total": self.unmapped_pages_total,
            "reclaimed_pages_total": self.reclaimed_pages_total,
            "map_seconds": self.map_seconds,
            "page_create_calls": self.pool.create_calls,
        }

    # --- lifetime -----------------------------------------------------------------------------
    def close(self) -> None:
        """Unmap and release everything. Idempotent. An error of a pending ``step_async`` is
        dropped here: the cache is going away anyway."""
        if self._closed:
            return
        # A cache dropped while step_async ran can be collected on the mapping thread itself
        # (its task held the last reference): that thread's task is over, and it cannot join itself.
        on_worker = threading.get_ident() == self._worker_ident
        if self._pending is not None and not on_worker:
            # The buffer must not go while a map is in flight: if this wait is interrupted, the
            # cache stays open (and whole) for another close().
            self._pending.exception()
        self._closed = True
        self._pending = None
        try:
            if self._executor is not None:
                self._executor.shutdown(wait=not on_worker)
        finally:
            self.k, self.v = [], []
            try:
                self.pool.give(self.buffer.close())
                self.pool.close()
            finally:
                self.backend.close()

    def __enter__(self) -> "KVCache":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        if not getattr(self, "_closed", True):
            try:
                self.close()
            except Exception:
                pass

    def __repr__(self) -> str:
        return (f"KVCache(layers={self.num_layers}, kv_heads={self.num_kv_heads}, "
                f"head_dim={self.head_dim}, batch={self.max_batch_size}, seq={self.max_seq_len}, "
                f"dtype={self.dtype}, backend={self.selection.name}, page_size={self.page_size})")

    # --- helpers ------------------------------------------------------------------------------
    def _join(self) -> None:
        if self._closed:
            raise RuntimeError("this KVCache is closed")
        pending = self._pending
        if pending is None:
            return
        try:
            pending.result()  # re-raises the background thread's error here
        finally:
            if pending.done():  # not if the wait itself was interrupted (KeyboardInterrupt)
                self._pending = None

    def _set_capacity(self, slot: int) -> None:
        tokens = min(self.max_seq_len, int(self._mapped[slot]) * self.page_size // self.token_bytes)
        self._capacity[slot] = tokens
        self._capacity_arr[slot] = tokens

    def _sync_lens(self) -> None:
        """Make both copies of the lengths current."""
        self._refresh_numpy()
        self._refresh_dict()

    def _refresh_numpy(self) -> None:
        if self._np_stale:
            self._seq_lens[list(map(int, self._lens))] = list(self._lens.values())
            self._np_stale = False

    def _refresh_dict(self) -> None:
        if self._dict_stale:
            active = np.flatnonzero(self._active)
            self._lens = dict(zip(active.tolist(), self._seq_lens[active].tolist()))
            self._dict_stale = False

    def _pages_for(self, seq_len):
        return -(-seq_len * self.token_bytes // self.page_size)

    def _check_slot(self, slot, name: str) -> None:
        if isinstance(slot, bool) or not isinstance(slot, (int, np.integer)) \
                or not 0 <= slot < self.max_batch_size:
            raise ValueError(f"{name}={slot!r} is not a slot id in [0, {self.max_batch_size})")

    def _parse(self, seq_lens: SeqLens) -> tuple[np.ndarray, np.ndarray]:
        """Validate ``seq_lens``; return (slots, lengths) as int64 arrays."""
        if isinstance(seq_lens, Mapping):
            slots, lens = np.array(list(seq_lens.keys())), np.array(list(seq_lens.values()))
            if len(slots) and (slots.dtype.kind not in "iu" or lens.dtype.kind not in "iu"):
                raise ValueError("seq_lens: slot ids and lengths must be integers")
            slots, lens = slots.astype(np.int64), lens.astype(np.int64)
        else:
            if isinstance(seq_lens, torch.Tensor):
                seq_lens = seq_lens.detach().cpu().numpy()
            arr = np.asarray(seq_lens)
            if arr.shape != (self.max_batch_size,) or arr.dtype.kind not in "iu":
                raise ValueError(f"seq_lens must be a mapping slot -> length or an integer sequence of "
                                 f"length max_batch_size={self.max_batch_size}, got shape {arr.shape} "
                                 f"dtype {arr.dtype}")
            stray = np.flatnonzero((arr != 0) & ~self._active)
            if len(stray):
                raise ValueError(f"seq_lens: slots {stray[:4].tolist()} are not allocated (alloc_slot first)")
            slots = np.flatnonzero(self._active)
            lens = arr[slots].astype(np.int64)
        if len(slots):
            if slots.min() < 0 or slots.max() >= self.max_batch_size:
                raise ValueError(f"seq_lens: slot ids must lie in [0, {self.max_batch_size})")
            if not self._active[slots].all():
                bad = slots[~self._active[slots]][:4].tolist()
                raise ValueError(f"seq_lens: slots {bad} are not allocated (alloc_slot first)")
            if lens.min() < 0 or lens.max() > self.max_seq_len:
                raise ValueError(f"seq_lens: lengths must lie in [0, max_seq_len={self.max_seq_len}]")
        return slots, lens

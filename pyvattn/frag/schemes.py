"""KV-cache allocation schemes, each as a memory model with the same interface as a real cache.

Every scheme is the same mechanism at a different granularity: each request slot owns, in each of
``2 * num_layers`` regions (K and V of every layer), a number of fixed-size units of ``unit_bytes``.

* static reservation (Orca, FasterTransformer): one unit of ``max_len`` tokens per region;
* PagedAttention with blocks of B tokens: units of ``B * token_bytes``;
* vAttention with pages of P bytes: units of P bytes (``P / token_bytes`` tokens, possibly
  fractional), optionally with deferred reclaim.

:class:`UnitMemory` reproduces :class:`pyvattn.KVCache`'s policies exactly (best-fit slot reuse,
all-or-nothing growth, reclaim of finished requests' pages only when the budget is spent, in the
same order), so a simulation and a run on a real cache can be compared step by step.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

import numpy as np

from ..units import format_size

KiB, MiB = 1 << 10, 1 << 20
_MAX_JUMP = 4096  # steps simulated at once: bounds a (slots x steps) array to a few MiB
_RECLAIM_JUMP = 256  # steps past the unspent budget one advance looks at when it may reclaim


@dataclass(frozen=True)
class Scheme:
    """An allocation scheme: ``kind`` is "static", "paged" (``block_tokens``) or "vattn"
    (``page_bytes``); ``deferred_reclaim`` keeps a finished request's units for the next one."""

    kind: str
    block_tokens: int = 0
    page_bytes: int = 0
    deferred_reclaim: bool = False
    label: str = ""  # overrides the derived name

    @property
    def name(self) -> str:
        if self.label:
            return self.label
        if self.kind == "static":
            return "static (max length)"
        if self.kind == "paged":
            return f"paged {self.block_tokens}-token blocks"
        base = f"vAttention {format_size(self.page_bytes).replace(' ', '')}"
        return base + (" + deferred reclaim" if self.deferred_reclaim else "")

    def unit_bytes(self, token_bytes: int, max_len: int) -> int:
        """Bytes of one allocation unit in one region (one layer's K or V)."""
        if self.kind == "static":
            return max_len * token_bytes
        if self.kind == "paged":
            return self.block_tokens * token_bytes
        return self.page_bytes


def on_os_pages(scheme: Scheme, token_bytes: int, max_len: int, os_page: int = 4096) -> Scheme:
    """``scheme`` with a unit that is a whole number of OS pages, as a host cache needs. Only static
    reservation can need a change: one page of ``max_len`` tokens rounded up behaves exactly like a
    reservation of ``max_len`` tokens (every length up to ``max_len`` needs exactly one unit)."""
    unit = scheme.unit_bytes(token_bytes, max_len)
    if unit % os_page == 0:
        return scheme
    if scheme.kind != "static":
        raise ValueError(f"scheme={scheme.name!r}: a unit of {unit} B is not a whole number of {os_page} B pages")
    rounded = -(-unit // os_page) * os_page
    return Scheme("vattn", page_bytes=rounded, label=f"{scheme.name}, {format_size(rounded)} page")


DEFAULT_SCHEMES: tuple[Scheme, ...] = (
    Scheme("static"),
    Scheme("paged", block_tokens=16),
    Scheme("paged", block_tokens=32),
    Scheme("paged", block_tokens=256),
    *(Scheme("vattn", page_bytes=p) for p in (64 * KiB, 128 * KiB, 256 * KiB, 2 * MiB)),
    *(Scheme("vattn", page_bytes=p, deferred_reclaim=True) for p in (64 * KiB, 128 * KiB, 256 * KiB, 2 * MiB)),
)


class UnitMemory:
    """Simulated KV memory: ``max_batch`` slots, each holding units in ``regions`` regions, under
    a budget of whole units. Interface shared with the measured model (a real KVCache):
    ``alloc(length) -> slot | None``, ``grow(slots, lens) -> bool`` (all or nothing), ``free(slot)``,
    ``need_units(lens)``, ``budget_units``, ``available_units()``, ``allocated_bytes()``,
    ``retained_bytes()``, ``held_bytes(slots)``, ``advance(slots, lens, horizon)``.

    Units count every region: a request of L tokens holds ``need_units(L)`` units in all. Memory
    that no running request needs for its current length (a finished slot's units under deferred
    reclaim, or what a reused slot holds beyond its length) is *retained*: reclaimable at once."""

    def __init__(self, unit_bytes: int, token_bytes: int, regions: int, max_batch: int, max_len: int,
                 budget_bytes: int | None, deferred_reclaim: bool):
        self.unit_bytes, self.token_bytes, self.regions = unit_bytes, token_bytes, regions
        self.max_len = max_len
        self.budget_units = None if budget_bytes is None else budget_bytes // unit_bytes
        self.deferred_reclaim = deferred_reclaim
        self.active = np.zeros(max_batch, dtype=bool)
        self.units = np.zeros(max_batch, dtype=np.int64)  # per region, per slot
        self.total_units = 0  # == units.sum(), kept up to date (summing every step is a hot spot)
        self.lens = np.zeros(max_batch, dtype=np.int64)  # tokens each active slot last grew to
        self.reclaimed_units = 0

    def units_for(self, lens: np.ndarray | int) -> np.ndarray | int:
        """Units per region that ``lens`` tokens occupy."""
        return -(-lens * self.token_bytes // self.unit_bytes)

    def need_units(self, lens: np.ndarray | int) -> np.ndarray | int:
        """Units in all regions that a request of ``lens`` tokens holds."""
        return self.units_for(lens) * self.regions

    def need_bytes(self, lens: np.ndarray | int) -> np.ndarray | int:
        return self.need_units(lens) * self.unit_bytes

    def retained_units(self) -> int:
        """Units (all regions) beyond what running requests need: reclaimable at once."""
        if not self.deferred_reclaim:
            return 0  # freed at once, and a slot never holds more than its length needs
        keep = np.where(self.active, self.units_for(self.lens), 0)
        return int(np.maximum(self.units - keep, 0).sum()) * self.regions

    def available_units(self) -> int:
        """Units (all regions) a new request could have now: unspent budget plus retained units."""
        if self.budget_units is None:
            return 1 << 62
        return self.budget_units - self.total_units * self.regions + self.retained_units()

    def alloc(self, length: int) -> int | None:
        free = (~self.active).nonzero()[0]
        if len(free) == 0:
            return None
        units = self.units[free]
        fits = free[units >= self.units_for(length)] if length else free[:0]
        slot = int(fits[np.argmin(self.units[fits])] if len(fits) else free[np.argmax(units)])
        self.active[slot] = True
        self.lens[slot] = 0
        return slot

    def grow(self, slots: np.ndarray, lens: np.ndarray) -> bool:
        need = self.units_for(lens)
        growing = need > self.units[slots]
        if growing.any():
            g_slots, g_need = slots[growing], need[growing]
            added = int((g_need - self.units[g_slots]).sum())
            if self.budget_units is not None:
                short = (added + self.total_units) * self.regions - self.budget_units
                if short > 0:
                    keep = np.where(self.active, self.units_for(self.lens), 0)
                    keep[slots] = np.maximum(keep[slots], need)
                    if not self._reclaim(short, keep):
                        return False
            self.units[g_slots] = g_need
            self.total_units += added
        self.lens[slots] = np.maximum(self.lens[slots], lens)
        return True

    def _reclaim(self, short: int, keep: np.ndarray) -> bool:
        # KVCache._take_pages: finished slots first, then active slots' excess; most first
        excess = np.maximum(self.units - keep, 0)
        if short > int(excess.sum()) * self.regions:
            return False
        per_region = -(-short // self.regions)
        # Usually the first donor covers it: that is the finished slot with the most excess (else
        # the active one); argmax picks the lowest slot among equals, as the stable sort does.
        finished = np.where(self.active, 0, excess)
        first = int(finished.argmax()) if finished.any() else int(excess.argmax())
        if excess[first] >= per_region:
            donors = [first]
        else:
            donors = (excess > 0).nonzero()[0]
            donors = donors[np.lexsort((-excess[donors], self.active[donors]))].tolist()
        for slot in donors:
            take = min(per_region, int(excess[slot]))
            self.units[slot] -= take
            self.total_units -= take
            self.reclaimed_units += take * self.regions
            per_region -= take
            if per_region <= 0:
                break
        return True

    def free(self, slot: int) -> None:
        self.active[slot] = False
        if not self.deferred_reclaim:
            self.total_units -= int(self.units[slot])
            self.units[slot] = 0

    def allocated_bytes(self) -> int:
        return self.total_units * self.regions * self.unit_bytes

    def retained_bytes(self) -> int:
        return self.retained_units() * self.unit_bytes

    def capacity(self, slots: np.ndarray) -> np.ndarray:
        """Tokens each slot's units cover (what it can grow to without allocating)."""
        return np.minimum(self.max_len, self.units[slots] * self.unit_bytes // self.token_bytes)

    def advance(self, slots: np.ndarray, lens: np.ndarray, horizon: int) -> tuple[np.ndarray, np.ndarray]:
        """Grow every slot in ``slots`` (all the active ones) from ``lens`` by one token per step
        for as many steps ``k <= horizon`` as can run without a preemption, exactly as that many
        :meth:`grow` calls would: within the unspent budget and, with deferred reclaim, with
        shortfalls reclaimed from finished slots (in :meth:`_reclaim`'s order). Returns the
        allocated and the retained bytes after each of those steps (two arrays of length k)."""
        horizon = min(horizon, self.max_len - int(lens.max()), _MAX_JUMP)
        held, total0 = self.units[slots], self.total_units
        spare = None if self.budget_units is None else self.budget_units - self.total_units * self.regions
        donors = self.deferred_reclaim and bool((self.units[~self.active] > 0).any())
        if spare is not None and spare < self.regions:
            # Not one more unit fits: without donors only the steps inside what every slot holds
            free_steps = int((self.capacity(slots) - lens).min())
            horizon = min(horizon, max(0, free_steps) if not donors else free_steps + _RECLAIM_JUMP)
        if horizon <= 0:
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
        need = self.units_for(lens[:, None] + np.arange(1, horizon + 1)[None, :])
        added = np.maximum(need - held[:, None], 0).sum(axis=0)  # per region, cumulative: non-decreasing
        reclaimed = np.zeros(horizon, dtype=np.int64)  # per region, cumulative
        if spare is None:
            steps = horizon
        else:
            steps = int(np.searchsorted(added * self.regions, spare, side="right"))
            if donors and steps < horizon:
                steps = self._reclaim_run(added, steps, reclaimed)
        if not steps:
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
        need, added, reclaimed = need[:, :steps], added[:steps], reclaimed[:steps]
        grown = np.maximum(held, need[:, -1])
        self.total_units += int((grown - held).sum())  # after _reclaim_run took its reclaims
        self.units[slots] = grown
        self.lens[slots] = lens + steps
        allocated = (total0 - reclaimed + added) * self.regions * self.unit_bytes
        return allocated, self._retained_after(held, need, reclaimed)

    def _reclaim_run(self, added: np.ndarray, start: int, reclaimed: np.ndarray) -> int:
        """Continue an :meth:`advance` from step ``start`` with deferred reclaim: each step's
        shortfall is reclaimed as :meth:`grow` would (whole units per region, from the finished
        slot with the most units, the lowest slot among equals), as long as that one slot covers
        it (grow() handles the rest). ``added`` is the advance's cumulative units per region.
        Takes the units from the donors (``total_units`` drops by what was taken), fills
        ``reclaimed`` (cumulative units per region) and returns the number of steps that run."""
        heap = [(-int(self.units[s]), s) for s in (~self.active & (self.units > 0)).nonzero()[0].tolist()]
        heapq.heapify(heap)
        regions, budget, base = self.regions, self.budget_units, self.total_units
        taken = 0
        for step in range(start, len(added)):
            short = (base - taken + int(added[step])) * regions - budget
            if short > 0:
                per_region = -(-short // regions)
                if not heap or per_region > -heap[0][0]:
                    self.total_units = base - taken
                    return step
                units, slot = heapq.heappop(heap)  # units negated: the most first
                if units + per_region < 0:
                    heapq.heappush(heap, (units + per_region, slot))
                self.units[slot] -= per_region
                taken += per_region
                self.reclaimed_units += per_region * regions
            reclaimed[step] = taken
        self.total_units = base - taken
        return len(added)

    def _retained_after(self, held: np.ndarray, need: np.ndarray, reclaimed: np.ndarray) -> np.ndarray:
        """Retained bytes after each step of an advance (call it once ``self.lens`` and
        ``self.units`` hold the advance's end state): the advancing slots held ``held`` units and
        needed ``need[:, k]`` after step k, and ``reclaimed[k]`` units per region had been taken
        from finished slots by then; a slot's units beyond its need shrink as it grows into
        them, and no other slot changes."""
        if not self.deferred_reclaim:
            return np.zeros(need.shape[1], dtype=np.int64)
        mine = np.maximum(held[:, None] - need, 0).sum(axis=0)
        others = self.retained_units() // self.regions - int(mine[-1]) + int(reclaimed[-1])
        return (others - reclaimed + mine) * self.regions * self.unit_bytes

    def held_bytes(self, slots: np.ndarray) -> np.ndarray:
        """Bytes each slot holds across all regions."""
        return self.units[slots] * self.unit_bytes * self.regions

    def close(self) -> None:
        pass


class CacheMemory:
    """The measured model: the same interface over a real :class:`pyvattn.KVCache` (public API
    only: ``alloc_slot``, ``step``, ``free_slot``, ``stats``, ``mapped_tokens``, ``seq_len``,
    ``slot_mapped_bytes``). Its books (which slots run, at what length) come from the cache."""

    def __init__(self, cache):
        self.cache = cache
        self.unit_bytes, self.token_bytes = cache.page_size, cache.token_bytes
        self.regions = cache.num_regions
        self.budget_units = cache.stats()["budget_pages"]
        self._active: set[int] = set()

    def units_for(self, lens):
        return -(-lens * self.token_bytes // self.unit_bytes)

    def need_units(self, lens):
        return self.units_for(lens) * self.regions

    def need_bytes(self, lens):
        return self.need_units(lens) * self.unit_bytes

    def alloc(self, length: int) -> int | None:
        from ..errors import OutOfSlots

        try:
            slot = self.cache.alloc_slot(seq_len=length)
        except OutOfSlots:
            return None
        self._active.add(slot)
        return slot

    def grow(self, slots: np.ndarray, lens: np.ndarray) -> bool:
        from ..errors import OutOfPages

        try:
            self.cache.step(dict(zip(slots.tolist(), lens.tolist())))
        except OutOfPages:
            return False
        return True

    def free(self, slot: int) -> None:
        self.cache.free_slot(slot)
        self._active.discard(slot)

    def allocated_bytes(self) -> int:
        return self.cache.stats()["mapped_bytes"]

    def retained_bytes(self) -> int:
        """Mapped bytes no running request needs for its length (the cache's ``retained_bytes``
        where it reports one; else counted here from each slot's mapped pages and length)."""
        stats = self.cache.stats()
        if "retained_bytes" in stats:
            return stats["retained_bytes"]
        needed = sum(int(self.need_bytes(self.cache.seq_len(s))) for s in self._active)
        return stats["mapped_bytes"] - needed

    def available_units(self) -> int:
        if self.budget_units is None:
            return 1 << 62
        mapped_units = self.cache.stats()["mapped_bytes"] // self.unit_bytes
        return self.budget_units - mapped_units + self.retained_bytes() // self.unit_bytes

    def capacity(self, slots: np.ndarray) -> np.ndarray:
        return np.array([self.cache.mapped_tokens(s) for s in slots.tolist()], dtype=np.int64)

    def held_bytes(self, slots: np.ndarray) -> np.ndarray:
        return np.array([self.cache.slot_mapped_bytes(s) for s in slots.tolist()], dtype=np.int64)

    def advance(self, slots: np.ndarray, lens: np.ndarray, horizon: int) -> tuple[np.ndarray, np.ndarray]:
        """Steps the slots can grow within their mapped pages (nothing to map, so no call to the
        cache: the next real step catches its lengths up); allocated and retained bytes after
        each (retained shrinks as a reused slot grows into pages it already holds)."""
        steps = max(0, min(horizon, int((self.capacity(slots) - lens).min())))
        if not steps:
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
        held = self.held_bytes(slots)[:, None]
        need = self.need_bytes(lens[:, None] + np.arange(1, steps + 1)[None, :])
        now = np.maximum(held - self.need_bytes(lens)[:, None], 0).sum()
        retained = self.retained_bytes() - now + np.maximum(held - need, 0).sum(axis=0)
        return np.full(steps, self.allocated_bytes(), dtype=np.int64), retained

    def close(self) -> None:
        self.cache.close()

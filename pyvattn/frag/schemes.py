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

from dataclasses import dataclass

import numpy as np

from ..units import format_size

KiB, MiB = 1 << 10, 1 << 20
_MAX_JUMP = 4096  # steps simulated at once: bounds a (slots x steps) array to a few MiB


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
    ``alloc(prompt) -> slot | None``, ``grow(slots, lens) -> bool`` (all or nothing), ``free(slot)``,
    ``allocated_bytes()``, ``capacity(slots) -> tokens``, ``advance(slots, lens, horizon)``."""

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
        return -(-lens * self.token_bytes // self.unit_bytes)

    def alloc(self, prompt: int) -> int | None:
        free = (~self.active).nonzero()[0]
        if len(free) == 0:
            return None
        units = self.units[free]
        fits = free[units >= self.units_for(prompt)] if prompt else free[:0]
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

    def capacity(self, slots: np.ndarray) -> np.ndarray:
        """Tokens each slot's units cover (what it can grow to without allocating)."""
        return np.minimum(self.max_len, self.units[slots] * self.unit_bytes // self.token_bytes)

    def advance(self, slots: np.ndarray, lens: np.ndarray, horizon: int) -> np.ndarray:
        """Grow every slot in ``slots`` from ``lens`` by one token per step for as many steps
        ``k <= horizon`` as fit the unspent budget without reclaiming anything, exactly as that
        many :meth:`grow` calls would; return the allocated bytes after each of those steps."""
        horizon = min(horizon, self.max_len - int(lens.max()), _MAX_JUMP)
        if horizon <= 0:
            return np.zeros(0, dtype=np.int64)
        held = self.units[slots]
        spare = None if self.budget_units is None else self.budget_units - self.total_units * self.regions
        if spare is not None and spare < self.regions:
            # Not one more unit fits: only the steps every slot can take inside what it holds.
            steps = max(0, min(horizon, int((self.capacity(slots) - lens).min())))
            self.lens[slots] = lens + steps
            return np.full(steps, self.allocated_bytes(), dtype=np.int64)
        need = self.units_for(lens[:, None] + np.arange(1, horizon + 1)[None, :])
        extra = np.maximum(need - held[:, None], 0).sum(axis=0) * self.regions  # non-decreasing in k
        if spare is not None:
            extra = extra[: int(np.searchsorted(extra, spare, side="right"))]
        steps = len(extra)
        if steps:
            grown = np.maximum(held, need[:, steps - 1])
            self.total_units += int((grown - held).sum())
            self.units[slots] = grown
            self.lens[slots] = lens + steps
        return self.allocated_bytes() - (extra[-1:] - extra) * self.unit_bytes if steps else extra

    def held_bytes(self, slots: np.ndarray) -> np.ndarray:
        """Bytes each slot holds across all regions."""
        return self.units[slots] * self.unit_bytes * self.regions

    def close(self) -> None:
        pass


class CacheMemory:
    """The measured model: the same interface over a real :class:`pyvattn.KVCache`."""

    def __init__(self, cache):
        self.cache = cache

    def alloc(self, prompt: int) -> int | None:
        from ..errors import OutOfSlots

        try:
            return self.cache.alloc_slot(seq_len=prompt)
        except OutOfSlots:
            return None

    def grow(self, slots: np.ndarray, lens: np.ndarray) -> bool:
        from ..errors import OutOfPages

        try:
            self.cache.step(dict(zip(slots.tolist(), lens.tolist())))
        except OutOfPages:
            return False
        return True

    def free(self, slot: int) -> None:
        self.cache.free_slot(slot)

    def allocated_bytes(self) -> int:
        return self.cache.stats()["mapped_bytes"]

    def capacity(self, slots: np.ndarray) -> np.ndarray:
        return np.array([self.cache.mapped_tokens(s) for s in slots.tolist()], dtype=np.int64)

    def held_bytes(self, slots: np.ndarray) -> np.ndarray:
        return np.array([self.cache.slot_mapped_bytes(s) for s in slots.tolist()], dtype=np.int64)

    def advance(self, slots: np.ndarray, lens: np.ndarray, horizon: int) -> np.ndarray:
        """Steps the slots can grow within their mapped pages (nothing to map, so no call to the
        cache: the next real step catches its lengths up); allocated bytes after each."""
        steps = max(0, min(horizon, int((self.capacity(slots) - lens).min())))
        return np.full(steps, self.allocated_bytes(), dtype=np.int64)

    def close(self) -> None:
        self.cache.close()

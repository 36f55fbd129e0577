"""MappingEngine: what a step maps, and what it reclaims when the pool and the budget fall short."""

from __future__ import annotations

import time

import numpy as np

from ..errors import OutOfPages
from .reclaim import Reclaim


class MappingEngine:
    """KVCache's growth path (a mixin over the cache's slabs, slots, pool, backend and stats).

    ``_grow`` maps, all or nothing, the pages a step needs beyond what each slot holds; pages come
    from the pool, and when the pool and the budget fall short, from mapped pages no running
    request needs (``_reclaim_plan``: finished requests' first, least recently used first, a shared
    page counted only when its last mapping goes). Callers hold the cache's lock.
    """

    def _grow(self, slots: np.ndarray, lens: np.ndarray) -> None:
        """Map what ``lens`` needs beyond what each slot holds; all or nothing."""
        self._stats.unmapped(self._slabs.settle())
        need = self._slabs.pages_for(lens)
        keep = np.where(self._slots.active, self._slabs.pages_for(self._slots.lengths), 0)
        keep[slots] = np.maximum(keep[slots], need)
        growing = need > self._slabs.held[slots]
        t0 = time.perf_counter()
        pages = self._slabs.grow(slots[growing], need[growing], lambda n, vas: self._supply(n, vas, keep))
        self._stats.mapped(pages, time.perf_counter() - t0)

    def _supply(self, count: int, vas: np.ndarray, keep: np.ndarray) -> list[int]:
        """``count`` pages for ``vas`` from the pool, reclaiming mapped pages beyond ``keep`` when
        the pool and budget fall short, but only once it is sure the reclaim makes it fit."""
        try:
            return self.pool.take(count, vas)
        except OutOfPages as exc:
            short, budget_refused = count - exc.available, exc.available > self.pool.free_pages
        plan = self._reclaim_plan()
        if budget_refused and short <= plan.reclaimable(keep):
            try:  # the budget allows part of it: the device must agree before anything is reclaimed
                self.pool.stock(count, vas)
            except OutOfPages:
                short = count - self.pool.free_pages
        if short > plan.reclaimable(keep):
            raise OutOfPages(
                f"step needs {count} pages of {self.page_size} bytes: {count - short} available, "
                f"{plan.reclaimable(keep)} reclaimable (finished requests' pages, and pages a reused "
                f"slot holds beyond its length)", needed=count,
                available=count - short + plan.reclaimable(keep)) from None
        self._reclaim(plan.plan(short, keep))
        return self.pool.take(count, vas)

    def _reclaim_plan(self) -> Reclaim:
        """The reclaim plan over the slabs as they are now (shared pages and retained prefixes' LRU
        taken into account): what ``step``, ``free_tokens`` and a lowered budget all count from."""
        shared = self.backend.mapped_pages != self.backend.mapped_handles
        return Reclaim(self._slabs.held, self._slots.active, self.num_regions,
                       self._slabs.page_table() if shared else None,
                       self._prefix.used if self._prefix.any() else None)  # LRU among retained prefixes

    def _reclaim(self, plan: list[tuple[int, int]]) -> None:
        """Give back ``pages`` (per region) from the top of each ``slot`` in the plan."""
        if not plan:
            return
        slots = np.array([s for s, _ in plan], dtype=np.int64)
        pages = np.array([p for _, p in plan], dtype=np.int64)
        self._stats.reclaimed(self._slabs.shrink(slots, np.maximum(self._slabs.extent[slots] - pages, 0)))

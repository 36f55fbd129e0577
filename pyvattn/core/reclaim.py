"""Reclaim: which mapped pages a step takes back when the pool and the budget fall short."""

from __future__ import annotations

import numpy as np


class Reclaim:
    """A pure plan over per-slot page counts (testable without a backend).

    ``held[s]`` is how many pages slot ``s`` holds in each of ``regions`` regions; a step says how
    many each slot must ``keep`` (an active slot: its stepped length's pages, or what the step asks;
    a free slot: none). Pages beyond ``keep`` are reclaimable, taken whole in every region:
    finished requests' slots first, least recently used first (``age``: smaller is older; a
    retained prefix that keeps serving hits stays), then pages an active slot holds beyond its
    length (left by a longer request that used the slot before: nothing the current request wrote
    lives there); within each group the slot with the most to give first, ties to the lower slot.

    Shared pages (prefix sharing): ``pages[s, i]`` is the handle of slot ``s``'s page ``i`` in
    one region (sharing is the same in every region), or None when no page is mapped twice. A
    shared page comes free only when every slot mapping it gives it back, so the counts below are
    of pages that come free, not of mappings removed.
    """

    def __init__(self, held: np.ndarray, active: np.ndarray, regions: int,
                 pages: np.ndarray | None = None, age: np.ndarray | None = None):
        self.held, self.active, self.regions, self.pages = held, active, regions, pages
        self.age = np.zeros(len(held), dtype=np.int64) if age is None else np.where(active, 0, age)

    def reclaimable(self, keep: np.ndarray) -> int:
        """Pages (all regions) that giving back everything beyond ``keep`` frees."""
        if self.pages is None:
            return int(np.maximum(self.held - keep, 0).sum()) * self.regions
        index = np.arange(self.pages.shape[1])
        mapped = index[None, :] < self.held[:, None]
        excess = mapped & (index[None, :] >= keep[:, None])
        handles, total = np.unique(self.pages[mapped], return_counts=True)
        given = np.zeros(len(handles), dtype=np.int64)
        np.add.at(given, np.searchsorted(handles, self.pages[excess]), 1)
        return int((given == total).sum()) * self.regions

    def plan(self, count: int, keep: np.ndarray) -> list[tuple[int, int]]:
        """``(slot, pages per region)`` to give back so that at least ``count`` pages (all regions)
        come free, in the order above; less if ``count`` exceeds ``reclaimable(keep)``."""
        excess = np.maximum(self.held - keep, 0)
        donors = np.flatnonzero(excess > 0)
        donors = donors[np.lexsort((-excess[donors], self.age[donors], self.active[donors]))]
        per_region = -(-count // self.regions)
        if self.pages is not None:
            return self._plan_shared(donors.tolist(), keep, per_region)
        out = []
        for slot in donors.tolist():
            if per_region <= 0:
                break
            take = min(per_region, int(excess[slot]))
            out.append((slot, take))
            per_region -= take
        return out

    def _plan_shared(self, donors: list[int], keep: np.ndarray, per_region: int) -> list[tuple[int, int]]:
        """Give back pages from the top of each donor in turn until ``per_region`` pages came free
        (a shared page: once its last mapping is given back); then each donor gives back only down
        to its lowest page that came free (a page still mapped elsewhere stays where it serves)."""
        handles, refs = np.unique(self.pages[self.pages >= 0], return_counts=True)
        left = dict(zip(handles.tolist(), refs.tolist()))
        taken: list[tuple[int, list[int]]] = []
        freed = 0
        for slot in donors:
            if freed >= per_region:
                break
            top = self.pages[slot, int(keep[slot]):int(self.held[slot])].tolist()[::-1]
            mine = []
            for h in top:
                mine.append(h)
                left[h] -= 1
                freed += left[h] == 0
                if freed >= per_region:
                    break
            taken.append((slot, mine))
        out = []
        for slot, mine in taken:
            came_free = [i for i, h in enumerate(mine) if left[h] == 0]
            if came_free:
                out.append((slot, came_free[-1] + 1))
        return out

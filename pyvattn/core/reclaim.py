"""Reclaim: which mapped pages a step takes back when the pool and the budget fall short."""

from __future__ import annotations

import numpy as np


class Reclaim:
    """A pure plan over per-slot page counts (testable without a backend).

    ``held[s]`` is how many pages slot ``s`` holds in each of ``regions`` regions; a step says how
    many each slot must ``keep`` (an active slot: its stepped length's pages, or what the step asks;
    a free slot: none). Pages beyond ``keep`` are reclaimable, taken whole in every region:
    finished requests' slots first, then pages an active slot holds beyond its length (left by a
    longer request that used the slot before: nothing the current request wrote lives there);
    within each group the slot with the most to give first, ties to the lower slot.
    """

    def __init__(self, held: np.ndarray, active: np.ndarray, regions: int):
        self.held, self.active, self.regions = held, active, regions

    def reclaimable(self, keep: np.ndarray) -> int:
        """Pages (all regions) held beyond ``keep``."""
        return int(np.maximum(self.held - keep, 0).sum()) * self.regions

    def plan(self, count: int, keep: np.ndarray) -> list[tuple[int, int]]:
        """``(slot, pages per region)`` to give back so that at least ``count`` pages (all regions)
        come free, in the order above; less if ``count`` exceeds ``reclaimable(keep)``."""
        excess = np.maximum(self.held - keep, 0)
        donors = np.flatnonzero(excess > 0)
        donors = donors[np.lexsort((-excess[donors], self.active[donors]))]
        per_region = -(-count // self.regions)
        out = []
        for slot in donors.tolist():
            if per_region <= 0:
                break
            take = min(per_region, int(excess[slot]))
            out.append((slot, take))
            per_region -= take
        return out

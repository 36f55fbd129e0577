"""CacheStats: activity counters, and the memory report ``KVCache.stats()`` returns."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class CacheStats:
    """What the cache did (counters only ever grow); ``report`` adds what it holds now."""

    map_calls: int = 0
    mapped_pages_total: int = 0
    unmapped_pages_total: int = 0
    reclaimed_pages_total: int = 0
    map_seconds: float = 0.0
    forks: int = 0
    shared_mappings_total: int = 0
    prefix_queries: int = 0
    prefix_hits: int = 0
    prefix_tokens_saved: int = 0

    def mapped(self, pages: int, seconds: float) -> None:
        self.map_calls += 1
        self.mapped_pages_total += pages
        self.map_seconds += seconds

    def reclaimed(self, pages: int) -> None:
        self.unmapped_pages_total += pages
        self.reclaimed_pages_total += pages

    def unmapped(self, pages: int) -> None:
        """Pages unmapped to finish what a failed call left (not a reclaim)."""
        self.unmapped_pages_total += pages

    def shared(self, mappings: int) -> None:
        """Pages mapped under a second slot (a fork: no memory, no copy)."""
        self.shared_mappings_total += mappings

    def prefix_hit(self, tokens: int) -> None:
        self.prefix_hits += 1
        self.prefix_tokens_saved += tokens

    def report(self, cache) -> dict:
        """Memory and activity of ``cache``. Bytes count K and V of all layers; mapped memory splits
        exactly into ``used_bytes`` (tokens stepped by running requests), ``fragmentation_bytes``
        (the rest of the pages those lengths need: the unused end of each request's last page) and
        ``retained_bytes`` (everything else mapped: finished requests' slots under deferred reclaim,
        pages a reused slot holds beyond what its length needs; reclaimable at once);
        ``waste_bytes`` is the last two together. A page mapped under several slots (prefix
        sharing) counts in each slot's bytes; ``shared_pages`` says how many mappings are of a page
        mapped elsewhere too (memory saved: ``shared_pages * page_size``), and ``physical_bytes``
        counts every page once."""
        slots, slabs, pool = cache._slots, cache._slabs, cache.pool
        P, regions = cache.page_size, cache.num_regions
        every = np.arange(cache.max_batch_size)
        pages = slabs.mapped(every)  # held in every region, plus anything a failed call left
        active = slots.active
        needed = np.where(active, slabs.pages_for(slots.lengths), 0) * regions  # pages the lengths need
        used = int(slots.lengths[active].sum()) * cache.token_bytes * regions
        fragmentation = int(needed.sum()) * P - used
        retained = int((pages - needed).sum()) * P
        return {
            **cache.backend.describe(),
            "tokens_per_page": P / cache.token_bytes,
            "bytes_per_token": cache.token_bytes * regions,
            "reserved_bytes": cache.buffer.nbytes,
            "mapped_bytes": cache.buffer.mapped_pages * P,
            "used_bytes": used,
            "fragmentation_bytes": fragmentation,
            "retained_bytes": retained,
            "waste_bytes": fragmentation + retained,
            "physical_bytes": pool.total_pages * P,
            "pool_pages_total": pool.total_pages,
            "pool_pages_free": pool.free_pages,
            "budget_pages": pool.budget_pages,
            "active_slots": int(active.sum()),
            "slots_with_mapped_pages": int((slabs.extent > 0).sum()),
            "map_calls": self.map_calls,
            "mapped_pages_total": self.mapped_pages_total,
            "unmapped_pages_total": self.unmapped_pages_total,
            "reclaimed_pages_total": self.reclaimed_pages_total,
            "map_seconds": self.map_seconds,
            "page_create_calls": pool.create_calls,
            "shared_pages": cache.backend.mapped_pages - cache.backend.mapped_handles,
            "forks": self.forks,
            "shared_mappings_total": self.shared_mappings_total,
            "prefix_queries": self.prefix_queries,
            "prefix_hits": self.prefix_hits,
            "prefix_tokens_saved": self.prefix_tokens_saved,
        }

"""Memory models for the serving loop: :class:`UnitMemory` simulates a scheme, reproducing
:class:`pyvattn.KVCache`'s policies exactly (best-fit slot reuse, all-or-nothing growth, reclaim
of finished requests' pages only when the budget is spent, in the same order), so that a
simulation and a run on a real cache (:class:`CacheMemory`) can be compared step by step.

Both count memory in *units*: one unit is ``unit_bytes`` of one region (one layer's K or V); a
request of L tokens holds ``need_units(L)`` units over all its regions.
"""

from __future__ import annotations

import heapq

import numpy as np

_MAX_JUMP = 4096  # steps simulated at once: bounds a (slots x steps) array to a few MiB
_NONE = np.iinfo(np.int64).max  # a masked-out slot in a best-fit search
_RECLAIM_JUMP = 256  # steps past the unspent budget one advance looks at when it may reclaim


class _ReclaimRun:
    """What an advance reclaimed: cumulative units per region after each step (all donors, and
    finished slots only), and each take from an active slot as (step, row in slots, units before,
    units after)."""

    def __init__(self, horizon: int):
        self.reclaimed = np.zeros(horizon, dtype=np.int64)
        self.from_finished = np.zeros(horizon, dtype=np.int64)
        self.active_takes: list[tuple[int, int, int, int]] = []


class UnitMemory:
    """Simulated KV memory: ``max_batch`` slots, each holding units in ``regions`` regions, under
    a budget of whole units. Interface shared with the measured model (a real KVCache):
    ``alloc(length) -> slot | None``, ``admit(length) -> slot | None`` (alloc and grow),
    ``grow(slots, lens) -> bool`` (all or nothing), ``free(slot)``,
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
        self.need = np.zeros(max_batch, dtype=np.int64)  # units_for(lens) of active slots, else 0
        self.needed_units = 0  # == need.sum(): units <= total_units; the rest is retained
        self.reclaimed_units = 0
        # tokens per unit when a unit holds a whole number of them (else 0): enables a fast path
        self._tokens_per_unit = unit_bytes // token_bytes if unit_bytes % token_bytes == 0 else 0

    def units_for(self, lens: np.ndarray | int) -> np.ndarray | int:
        """Units per region that ``lens`` tokens occupy."""
        return (lens * self.token_bytes + (self.unit_bytes - 1)) // self.unit_bytes

    def need_units(self, lens: np.ndarray | int) -> np.ndarray | int:
        """Units in all regions that a request of ``lens`` tokens holds."""
        return self.units_for(lens) * self.regions

    def need_bytes(self, lens: np.ndarray | int) -> np.ndarray | int:
        return self.need_units(lens) * self.unit_bytes

    def retained_units(self) -> int:
        """Units (all regions) beyond what running requests need: reclaimable at once."""
        return (self.total_units - self.needed_units) * self.regions  # an active slot holds >= its need

    def available_units(self) -> int:
        """Units (all regions) a new request could have now: unspent budget plus retained units."""
        if self.budget_units is None:
            return 1 << 62
        return self.budget_units - self.needed_units * self.regions

    def alloc(self, length: int) -> int | None:
        if not self.deferred_reclaim:  # every free slot holds nothing: the lowest one, as below
            slot = int(self.active.argmin())
            if self.active[slot]:
                return None
            self.active[slot] = True
            return slot
        # best fit: the free slot with the fewest units that cover ``length``, else the one with
        # the most; the lowest slot among equals
        units = self.units
        covering = np.where(self.active | (units < self.units_for(length)), _NONE, units) if length else None
        slot = int(covering.argmin()) if length else 0
        if not length or covering[slot] == _NONE:
            largest = np.where(self.active, -1, units)
            slot = int(largest.argmax())
            if largest[slot] < 0:
                return None
        self.active[slot] = True
        return slot

    def admit(self, length: int) -> int | None:
        """A slot grown to ``length`` tokens (``alloc`` then ``grow``, all or nothing), or None."""
        slot = self.alloc(length)
        if slot is None:
            return None
        need = self.units_for(length)
        added = need - int(self.units[slot])
        if added > 0:
            short = -1 if self.budget_units is None else \
                (added + self.total_units) * self.regions - self.budget_units
            if short > 0:  # reclaim as grow() would (this slot, short of its need, gives nothing)
                keep = self.need.copy()
                keep[slot] = need
                if not self._reclaim(short, keep):
                    self.free(slot)
                    return None
            self.units[slot] = need
            self.total_units += added
        self.need[slot] = need
        self.needed_units += need
        return slot

    def grow(self, slots: np.ndarray, lens: np.ndarray) -> bool:
        before = self.need[slots]
        need = np.maximum(self.units_for(lens), before)  # lengths never shrink
        held = self.units[slots]
        growing = need > held
        if growing.any():
            added = int((need - held)[growing].sum())
            if self.budget_units is not None:
                short = (added + self.total_units) * self.regions - self.budget_units
                if short > 0:
                    keep = self.need.copy()
                    keep[slots] = need
                    if not self._reclaim(short, keep):
                        return False
                    held = self.units[slots]  # a donor may be one of them
            self.units[slots] = np.maximum(held, need)
            self.total_units += added
        self.needed_units += int(need.sum()) - int(before.sum())
        self.need[slots] = need
        return True

    def _reclaim(self, short: int, keep: np.ndarray) -> bool:
        # KVCache._take_pages: finished slots first, then active slots' excess; most first
        per_region = -(-short // self.regions)
        # Usually the finished slot with the most (the lowest among equals) covers it alone
        finished = np.where(self.active, 0, self.units - keep)
        first = int(finished.argmax())
        if finished[first] >= per_region:
            self.units[first] -= per_region
            self.total_units -= per_region
            self.reclaimed_units += per_region * self.regions
            return True
        excess = np.maximum(self.units - keep, 0)
        if short > int(excess.sum()) * self.regions:
            return False
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
        self.needed_units -= int(self.need[slot])
        self.need[slot] = 0
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
        :meth:`grow` calls would: within the unspent budget and, with deferred reclaim, with each
        shortfall reclaimed as :meth:`_reclaim` would take it. Returns the allocated and the
        retained bytes after each of those steps (two arrays of length k; retained None where
        nothing is retained, without deferred reclaim)."""
        horizon = min(horizon, self.max_len - int(lens.max()), _MAX_JUMP)
        held, total0 = self.units[slots], self.total_units  # a copy (fancy indexing)
        spare = None if self.budget_units is None else self.budget_units - self.total_units * self.regions
        may_reclaim = self.deferred_reclaim and self.total_units * self.regions > 0
        if spare is not None and spare < self.regions:
            # Not one more unit fits: without reclaims only the steps inside what every slot holds
            free_steps = int((self.capacity(slots) - lens).min())
            horizon = min(horizon, max(0, free_steps) + (_RECLAIM_JUMP if may_reclaim else 0))
        if horizon <= 0:
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
        if horizon <= self._tokens_per_unit:
            if not self.deferred_reclaim:
                return self._advance_by_crossings(slots, lens, held, horizon, spare)
            return self._advance_deferred_by_crossings(slots, lens, held, horizon, spare, may_reclaim)
        need = self.units_for(lens[:, None] + np.arange(1, horizon + 1)[None, :])
        added = np.maximum(need - held[:, None], 0).sum(axis=0)  # per region, cumulative
        run = _ReclaimRun(horizon)
        if spare is None:
            steps = horizon
        else:
            steps = int(np.searchsorted(added * self.regions, spare, side="right"))
            if may_reclaim and steps < horizon:
                steps = self._reclaim_run(need, held, added, steps, run)
        if not steps:
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
        need, added = need[:, :steps], added[:steps]
        reclaimed, from_finished = run.reclaimed[:steps], run.from_finished[:steps]
        grown = np.maximum(held, need[:, -1])  # held: after any reclaims from these slots
        self.total_units = total0 - int(reclaimed[-1]) + int(added[-1])
        self.units[slots] = grown
        self.needed_units += int((need[:, -1] - self.need[slots]).sum())
        self.need[slots] = need[:, -1]
        allocated = (total0 - reclaimed + added) * self.regions * self.unit_bytes
        if not self.deferred_reclaim:
            return allocated, None
        # retained: finished slots' units (less what was taken from them) + the advancing slots'
        # units beyond their need (which shrink as they grow into them, or are taken)
        mine = np.maximum(held[:, None] - need, 0).sum(axis=0)
        for step, row, before, after in run.active_takes:  # before a take, that slot held more
            mine[:step] += np.maximum(before - need[row, :step], 0) - np.maximum(after - need[row, :step], 0)
        finished_now = self.retained_units() // self.regions - int(mine[-1])
        retained = finished_now + int(from_finished[-1]) - from_finished + mine
        return allocated, retained * self.regions * self.unit_bytes

    def _advance_by_crossings(self, slots, lens, held, horizon: int, spare: int | None):
        """:meth:`advance` without deferred reclaim when a unit holds a whole number of tokens and
        the jump is no longer than one unit: each slot then needs one more unit at most once, at
        the step its length first passes what it holds, so sorting those steps replaces the
        (slots x steps) array. Same result; the common case, so worth the second path."""
        crosses_at = held * self._tokens_per_unit - lens + 1  # step at which each needs one more
        crossing = np.sort(crosses_at)
        steps = horizon
        if spare is not None:
            affordable = spare // self.regions  # units per region the budget still allows
            if affordable < len(crossing) and crossing[affordable] <= horizon:
                steps = int(crossing[affordable]) - 1
        if steps <= 0:
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
        added = np.searchsorted(crossing, np.arange(1, steps + 1), side="right")  # cumulative
        grown = held + (crosses_at <= steps)
        total0 = self.total_units
        self.total_units += int(added[-1])
        self.needed_units += int(added[-1])  # without deferred reclaim every unit is needed
        self.units[slots] = self.need[slots] = grown
        return (total0 + added) * (self.regions * self.unit_bytes), None

    def _advance_deferred_by_crossings(self, slots, lens, held, horizon: int, spare: int | None,
                                       may_reclaim: bool):
        """:meth:`_advance_by_crossings` with deferred reclaim. A slot may hold more than its
        length needs (a reused slot): each step its need grows (at most once in a jump no longer
        than a unit), it takes a unit if it then needs more than it holds, else what it retains
        shrinks by one. Steps within the unspent budget are computed at once; from the first
        shortfall on, step by step, each shortfall taken as :meth:`grow` takes it (the finished
        slot with the most units if any finished slot holds units, else the active slot with the
        most beyond its need; the lowest slot among equals), while one donor covers it."""
        T, regions = self._tokens_per_unit, self.regions
        need0 = self.need[slots]
        grows_at = need0 * T - lens + 1  # step at which each slot's need grows by one unit
        crosses_at = held * T - lens + 1  # ... and at which it needs more than it holds
        crossing = np.sort(crosses_at)
        free_steps = horizon
        if spare is not None:
            affordable = spare // regions
            if affordable < len(crossing) and crossing[affordable] <= horizon:
                free_steps = int(crossing[affordable]) - 1
        total0 = self.total_units
        if free_steps:
            t_axis = np.arange(1, free_steps + 1)
            added = np.searchsorted(crossing, t_axis, side="right")  # cumulative units per region
            mine0 = int((held - need0).sum())  # units the advancing slots hold beyond their need
            shrinks = np.sort(grows_at[held > need0])
            mine = mine0 - np.searchsorted(shrinks, t_axis, side="right")
            finished0 = self.retained_units() // regions - mine0
            unit_bytes = regions * self.unit_bytes
            alloc, kept = (total0 + added) * unit_bytes, (finished0 + mine) * unit_bytes
            held_now = held + (crosses_at <= free_steps)
            need_now = need0 + (grows_at <= free_steps)
            added_total = int(added[-1])
        else:  # the budget is spent (the usual case with deferred reclaim): every step reclaims
            alloc, kept, held_now, need_now, added_total = [], [], held, need0.copy(), 0
        taken = 0
        if free_steps < horizon and may_reclaim:
            alloc, kept = list(alloc), list(kept)  # the step-by-step part appends to them
            added_total, taken = self._deferred_steps(held_now, need_now, grows_at, free_steps,
                                                      min(horizon, free_steps + _RECLAIM_JUMP), added_total,
                                                      alloc, kept)
        if not len(alloc):
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
        self.total_units = total0 - taken + added_total
        self.units[slots] = held_now
        self.needed_units += int((need_now - need0).sum())
        self.need[slots] = need_now
        return np.asarray(alloc, dtype=np.int64), np.asarray(kept, dtype=np.int64)

    def _deferred_steps(self, held, need, grows_at, start: int, stop: int, added: int,
                        alloc: list, kept: list) -> tuple[int, int]:
        """The step-by-step part of :meth:`_advance_deferred_by_crossings`, steps ``start + 1``
        to ``stop`` (``held``/``need``: the advancing slots' units after step ``start``, updated
        in place). Appends allocated and retained bytes per step that runs; returns the units per
        region grown (cumulative, from the jump's start) and taken from donors (already taken
        from the finished ones in ``self.units``)."""
        regions, budget, total0 = self.regions, self.budget_units, self.total_units
        due = ((grows_at > start) & (grows_at <= stop)).nonzero()[0]
        order = due[np.argsort(grows_at[due], kind="stable")]
        events, when = order.tolist(), grows_at[order].tolist()  # rows whose need grows, and when
        i = 0
        heap = None
        taken = 0
        finished = int(self.units[~self.active].sum())
        mine = int((held - need).sum())
        unit_bytes = self.unit_bytes
        for step in range(start + 1, stop + 1):
            crossing, shrinking = [], 0
            while i < len(events) and when[i] == step:
                row = events[i]
                i += 1
                if need[row] + 1 > held[row]:
                    crossing.append(row)
                else:
                    shrinking += 1
            short = (total0 - taken + added + len(crossing)) * regions - budget
            take = -(-short // regions) if short > 0 else 0
            donor = None
            if take:
                if heap is None:
                    heap, beyond = self._donor_heap()
                if heap:
                    if take > -heap[0][0] or (beyond is not None and heap[0] > beyond):
                        return added, taken  # several donors, or one outside the heap: grow() takes it
                else:
                    excess = held - need
                    for row in crossing:
                        excess[row] = 0  # a slot taking a unit this step has none to give
                    if shrinking:
                        for row in events[i - shrinking - len(crossing):i]:
                            if row not in crossing:
                                excess[row] -= 1
                    donor = int(excess.argmax())
                    if excess[donor] < take:
                        return added, taken
            # the step runs: apply its events, then the take
            for row in events[i - shrinking - len(crossing):i]:
                need[row] += 1
            for row in crossing:
                held[row] += 1
            added += len(crossing)
            mine -= shrinking
            if take:
                if donor is None:
                    units, slot = heapq.heappop(heap)  # units negated: the most first
                    if units + take < 0:
                        heapq.heappush(heap, (units + take, slot))
                    self.units[slot] -= take
                    finished -= take
                else:
                    held[donor] -= take
                    mine -= take
                taken += take
                self.reclaimed_units += take * regions
            alloc.append((total0 - taken + added) * regions * unit_bytes)
            kept.append((finished + mine) * regions * unit_bytes)
        return added, taken

    def _donor_heap(self, size: int = 16):
        """The finished slots with the most units, as a heap of (-units, slot), the order in which
        :meth:`_reclaim` takes them, and the best slot left out (same form; None if none): once
        the heap's top ranks after it, the heap is no longer the true order. A jump takes a few
        units at most, so the few largest donors are enough."""
        units = np.where(self.active, 0, self.units)
        order = np.argsort(-units, kind="stable")[:size + 1]  # the most first; the lowest slot among equals
        best = [(-u, s) for u, s in zip(units[order].tolist(), order.tolist()) if u > 0]
        heap, beyond = best[:size], (best[size] if len(best) > size else None)
        heapq.heapify(heap)
        return heap, beyond

    def _reclaim_run(self, need: np.ndarray, held: np.ndarray, added: np.ndarray, start: int,
                     run: "_ReclaimRun") -> int:
        """Continue an :meth:`advance` from step ``start`` with deferred reclaim. Each step's
        shortfall is reclaimed as :meth:`_reclaim` takes it when one donor covers it: the finished
        slot with the most units if any finished slot holds units, else the active slot with the
        most units beyond its need; the lowest slot among equals. The run stops at the first step
        that would need several donors (grow() handles that one). Takes the units, lowers ``held``
        for active donors and corrects ``added`` (cumulative units per region grown) for them,
        records what was taken in ``run``, and returns the number of steps that can run."""
        heap = [(-int(self.units[s]), s) for s in (~self.active & (self.units > 0)).nonzero()[0].tolist()]
        heapq.heapify(heap)
        regions, budget, base = self.regions, self.budget_units, self.total_units
        taken = finished_taken = 0
        for step in range(start, len(added)):
            short = (base - taken + int(added[step])) * regions - budget
            if short > 0:
                per_region = -(-short // regions)
                if heap:
                    if per_region > -heap[0][0]:
                        return step
                    units, slot = heapq.heappop(heap)  # units negated: the most first
                    if units + per_region < 0:
                        heapq.heappush(heap, (units + per_region, slot))
                    self.units[slot] -= per_region
                    finished_taken += per_region
                else:
                    excess = held - need[:, step]
                    row = int(excess.argmax())
                    if excess[row] < per_region:
                        return step
                    run.active_takes.append((step, row, int(held[row]), int(held[row]) - per_region))
                    held[row] -= per_region
                    # from here on this slot grows past its lowered units again
                    later = need[row, step + 1:]
                    added[step + 1:] += (np.maximum(later - held[row], 0)
                                         - np.maximum(later - held[row] - per_region, 0))
                taken += per_region
                self.reclaimed_units += per_region * regions
            run.reclaimed[step] = taken
            run.from_finished[step] = finished_taken
        return len(added)

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

    def admit(self, length: int) -> int | None:
        slot = self.alloc(length)
        if slot is not None and not self.grow(np.array([slot]), np.array([length])):
            self.free(slot)
            return None
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

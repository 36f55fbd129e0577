"""PagePool: physical pages created ahead of use, under a hard budget."""

from __future__ import annotations

from itertools import islice
from typing import Sequence

import numpy as np

from .backends.base import Backend
from .errors import OutOfPages

ANY = -1  # in a placement: no page in particular


class PagePool:
    """Free physical pages of one backend, so mapping rarely has to create pages on the hot path.

    * ``take(count, at=None)`` hands out ``count`` pages, all or nothing. Without ``at`` any free
      pages do, and missing ones are created in batches of at least ``grow_pages``. With ``at`` (the
      VAs the pages will be mapped at), a backend that places pages (host: the memfd offset follows
      the VA, so a slab stays one mapping) gets exactly the pages :meth:`Backend.placement` names:
      free ones if the pool has them, else new ones, made by moving free pages that sit elsewhere
      (release one, create one: the total stays) before adding pages under the budget. A named
      page that is in use elsewhere (mapped under another slot too: prefix sharing) cannot be
      had; any free page stands in for it.
    * ``OutOfPages`` from ``take`` says in ``available`` how many pages the pool could have handed
      out: free + budget headroom when the budget refused, free pages only when the device refused
      to create more (pages created before that stay free). Nothing is handed out.
    * ``give(handles)`` takes pages back (they must be unmapped); ``reserve(nbytes, at=None)``
      creates pages up front (vAttention's ``reserve_physical_pages``); ``trim`` releases free ones.
    * ``budget_pages`` caps the pages that exist at once (free + handed out); ``None`` = no cap. It
      may be lowered below ``total_pages`` (``KVCache.set_memory_budget``): nothing is taken back,
      the headroom is negative until pages are released.
    * ``account`` (a :class:`pyvattn.budget.BudgetAccount`, optional): a budget shared with other
      caches or processes. Pages are charged to it before they are created and released from it
      when they are released; the headroom is the smaller of the two budgets'.
    """

    def __init__(self, backend: Backend, budget_pages: int | None = None, grow_pages: int = 64,
                 account=None):
        if budget_pages is not None and budget_pages < 0:
            raise ValueError(f"budget_pages={budget_pages} must be >= 0")
        if grow_pages < 1:
            raise ValueError(f"grow_pages={grow_pages} must be >= 1")
        self.backend = backend
        self.budget_pages = budget_pages
        self.account = account
        self.grow_pages = grow_pages
        self._free: dict[int, None] = {}  # an ordered set: newest last
        self.total_pages = 0  # pages that exist: free + handed out
        self.create_calls = 0

    @property
    def page_size(self) -> int:
        return self.backend.page_size

    @property
    def free_pages(self) -> int:
        return len(self._free)

    @property
    def headroom(self) -> int:
        """Pages that may still be created under the budget(s): negative when a lowered
        ``budget_pages`` is below ``total_pages``."""
        own = (1 << 62) if self.budget_pages is None else self.budget_pages - self.total_pages
        if self.account is None:
            return own
        return min(own, self.account.headroom() // self.page_size)

    def free_handles(self) -> list[int]:
        """The free pages' handles (a copy)."""
        return list(self._free)

    def take(self, count: int, at=None) -> list[int]:
        if count <= 0:
            return []
        wanted = self._wanted(at)
        free = len(self._free)
        if count > free + self.headroom:
            raise OutOfPages(f"need {count} pages: {free} free and the budget allows {self.headroom} more",
                             needed=count, available=free + self.headroom)
        self._stock(count, wanted, make_room=True)
        if wanted is None:
            taken = list(islice(reversed(self._free), count))
        else:
            placed = set(wanted.tolist())
            spare = (h for h in reversed(self._free) if h not in placed)
            taken = [h if h != ANY else next(spare) for h in wanted.tolist()]
        for h in taken:
            del self._free[h]
        return taken

    def stock(self, count: int, at=None) -> None:
        """Create pages toward a request of ``count`` (``at`` as in ``take``), as many as the budget
        allows and no more, and keep them free: what the device will give is then known before
        anything is reclaimed for the rest. ``OutOfPages`` if the device refuses (what was created
        stays free)."""
        self._stock(count, self._wanted(at), make_room=False)

    def give(self, handles: Sequence[int]) -> None:
        handles = [int(h) for h in handles]
        if any(h in self._free for h in handles):
            raise ValueError("handles: some are already free in the pool (given back twice?)")
        self._free.update(dict.fromkeys(handles))

    def reserve(self, nbytes: int, at=None) -> int:
        """Make sure at least ``nbytes`` of pages exist (free or in use); return pages created.
        ``at``: VAs, in order of preference, the new pages should suit (see ``take``)."""
        want = -(-nbytes // self.page_size) - self.total_pages
        if want > self.headroom:
            raise OutOfPages(
                f"reserving {nbytes} bytes needs {want} more pages; the budget allows {self.headroom}",
                needed=want, available=self.headroom)
        if want <= 0:
            return 0
        wanted = self._wanted(at)
        if wanted is None:
            self._create(want)
        else:
            spots = [h for h in wanted.tolist() if h != ANY and h not in self._free][:want]
            self._create(len(spots), spots)
            if len(spots) < want:
                self._create(want - len(spots))
        return want

    def trim(self, keep_pages: int = 0) -> int:
        """Release free pages beyond ``keep_pages`` back to the device; return how many."""
        extra = len(self._free) - keep_pages
        if extra <= 0:
            return 0
        self._release(list(self._free)[:extra])
        return extra

    def close(self) -> None:
        """Release every free page. Pages still handed out are the caller's to give back first."""
        self.trim(0)

    def adopt_orphans(self) -> None:
        """Take in the pages a failed rollback left created (they exist: use or release them)."""
        orphans = self.backend.adopt_orphans()
        if orphans:
            self._free.update(dict.fromkeys(orphans))
            self.total_pages += len(orphans)

    # --- helpers -----------------------------------------------------------------------------
    def _wanted(self, at) -> np.ndarray | None:
        """The handles the backend places at ``at``; ``ANY`` for those in use elsewhere."""
        wanted = None if at is None else self.backend.placement(at)
        if wanted is not None and self.backend.has_shared:  # else a placed page is free or not live
            busy = self.backend.is_live(wanted)
            busy[busy] = [h not in self._free for h in wanted[busy].tolist()]
            if busy.any():
                wanted = np.where(busy, ANY, wanted)
        return wanted

    def _stock(self, count: int, wanted: np.ndarray | None, make_room: bool) -> None:
        """Create what a request of ``count`` (``wanted`` handles, if placed) lacks, within the
        budget; with ``make_room``, release free pages that are not wanted to stay within it."""
        self.adopt_orphans()  # pages a failed rollback left: they exist, use them
        if wanted is None:
            short = count - len(self._free)
            if short > 0 and self.headroom > 0:
                batch = min(max(short, self.grow_pages), self.headroom)
                try:
                    self._create(batch)
                except OutOfPages as exc:
                    if batch <= short:
                        raise self._refused(count) from exc
                    try:  # the device may fit exactly what is needed, not a whole batch
                        self._create(min(short, self.headroom))
                    except OutOfPages as exc2:
                        raise self._refused(count) from exc2
            return
        placed = [h for h in wanted.tolist() if h != ANY]
        loose = len(wanted) - len(placed)  # pages any free one will do for
        missing = [h for h in placed if h not in self._free]
        keep = set(placed)
        spare = [h for h in self._free if h not in keep]
        if missing and make_room:  # move free pages that sit elsewhere rather than add pages
            # (and, over a lowered budget, release what it is over by)
            self._release(spare[loose:loose + len(missing) + max(0, -self.headroom)])
        make = missing[:max(0, self.headroom)]
        try:
            if make:
                self._create(len(make), make)
            short = min(loose - len(spare), self.headroom)
            if short > 0:
                self._create(short)
        except OutOfPages as exc:
            raise self._refused(count) from exc

    def _refused(self, needed: int) -> OutOfPages:
        return OutOfPages(f"need {needed} pages: the device refused to create more ({len(self._free)} free "
                          f"in the pool, {self.headroom} more allowed by the budget)",
                          needed=needed, available=len(self._free))

    def _create(self, count: int, at: list[int] | None = None) -> None:
        nbytes = count * self.page_size
        if self.account is not None and not self.account.try_charge(nbytes):
            raise OutOfPages(f"need {count} pages: the shared memory budget refused {nbytes} bytes "
                             f"({self.account.headroom()} bytes left in it)", needed=count,
                             available=len(self._free))
        orphans = self.backend.orphan_pages
        try:
            handles = self.backend.create_pages(count, None if at is None else np.asarray(at, np.int64))
        except BaseException:
            if self.account is not None:  # pages a failed rollback left stay charged: they exist
                self.account.release(nbytes - (self.backend.orphan_pages - orphans) * self.page_size)
            raise
        self.create_calls += 1
        self._free.update(dict.fromkeys(handles))
        self.total_pages += count

    def _release(self, victims: list[int]) -> None:
        try:
            self.backend.release_pages(victims)
        except BaseException:
            gone = [h for h, live in zip(victims, self.backend.is_live(victims)) if not live]
            self._forget(gone)
            raise
        self._forget(victims)

    def _forget(self, handles: list[int]) -> None:
        for h in handles:
            del self._free[h]
        self.total_pages -= len(handles)
        if self.account is not None:
            self.account.release(len(handles) * self.page_size)

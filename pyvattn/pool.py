"""PagePool: physical pages created ahead of use, under a hard budget."""

from __future__ import annotations

from typing import Sequence

from .backends.base import Backend
from .errors import OutOfPages


class PagePool:
    """Free physical pages of one backend, so mapping rarely has to create pages on the hot path.

    * ``take(n)`` hands out ``n`` pages, creating missing ones in batches of at least
      ``grow_pages``; it raises :class:`OutOfPages` (handing out nothing) when the budget or the
      device cannot supply ``n``. Pages created before the failure stay in the pool.
    * ``give(handles)`` takes pages back (they must be unmapped).
    * ``reserve(nbytes)`` creates pages up front, like vAttention's ``reserve_physical_pages``.
    * ``budget_pages`` caps the pages that exist at once (free + handed out); ``None`` = no cap.
    """

    def __init__(self, backend: Backend, budget_pages: int | None = None, grow_pages: int = 64):
        if budget_pages is not None and budget_pages < 0:
            raise ValueError(f"budget_pages={budget_pages} must be >= 0")
        if grow_pages < 1:
            raise ValueError(f"grow_pages={grow_pages} must be >= 1")
        self.backend = backend
        self.budget_pages = budget_pages
        self.grow_pages = grow_pages
        self._free: list[int] = []
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
        """Pages that may still be created under the budget."""
        return (1 << 62) if self.budget_pages is None else self.budget_pages - self.total_pages

    def reserve(self, nbytes: int) -> int:
        """Make sure at least ``nbytes`` of pages exist (free or in use); return pages created."""
        want = -(-nbytes // self.page_size) - self.total_pages
        if want > self.headroom:
            raise OutOfPages(
                f"reserving {nbytes} bytes needs {want} more pages; the budget allows {self.headroom}",
                needed=want, available=self.headroom)
        if want > 0:
            self._create(want)
        return max(want, 0)

    def take(self, n: int) -> list[int]:
        if n <= 0:
            return []
        short = n - len(self._free)
        if short > 0:
            if short > self.headroom:
                raise OutOfPages(
                    f"need {n} pages: {len(self._free)} free and the budget allows {self.headroom} more",
                    needed=n, available=len(self._free) + self.headroom)
            batch = min(max(short, self.grow_pages), self.headroom)
            try:
                self._create(batch)
            except OutOfPages:
                if batch == short:
                    raise
                self._create(short)  # the device may fit exactly what is needed, not a whole batch
        taken = self._free[-n:]
        del self._free[-n:]
        return taken

    def give(self, handles: Sequence[int]) -> None:
        self._free.extend(handles)

    def trim(self, keep_pages: int = 0) -> int:
        """Release free pages beyond ``keep_pages`` back to the device; return how many."""
        extra = len(self._free) - keep_pages
        if extra <= 0:
            return 0
        victims = self._free[:extra]
        self.backend.release_pages(victims)
        del self._free[:extra]
        self.total_pages -= extra
        return extra

    def close(self) -> None:
        """Release every free page. Pages still handed out are the caller's to give back first."""
        self.trim(0)

    def _create(self, count: int) -> None:
        handles = self.backend.create_pages(count)
        self.create_calls += 1
        self._free.extend(handles)
        self.total_pages += count

"""MemoryBudget: one limit shared by the caches of this process."""

from __future__ import annotations

import itertools
import os
import threading
from dataclasses import dataclass

from .account import AccountRow, Budget, checked_limit


@dataclass
class _Books:
    label: str
    charged: int = 0
    used: int = 0
    retained: int = 0


class MemoryBudget(Budget):
    """A limit in bytes (int, ``"8GiB"``, or ``None`` for unlimited) that several caches of one
    process grow within together, each through its own :class:`BudgetAccount`.

    One ``threading.Lock`` guards the books; the total is the sum over accounts (a handful).
    ``set_limit`` below ``used()`` is allowed: it takes nothing back, it only makes ``headroom()``
    0 until releases bring the use under the new limit.
    """

    def __init__(self, limit: int | str | None = None):
        self._limit = checked_limit(limit)
        self._lock = threading.Lock()
        self._accounts: dict[int, _Books] = {}
        self._ids = itertools.count()

    @property
    def limit(self) -> int | None:
        return self._limit

    def set_limit(self, nbytes: int | str | None) -> None:
        limit = checked_limit(nbytes)
        with self._lock:
            self._limit = limit

    def used(self) -> int:
        with self._lock:
            return self._used_locked()

    def rows(self) -> list[AccountRow]:
        with self._lock:
            return [AccountRow(os.getpid(), b.label, b.charged, b.used, b.retained)
                    for b in self._accounts.values()]

    def _used_locked(self) -> int:
        return sum(b.charged for b in self._accounts.values())

    def _open(self, label: str) -> int:
        with self._lock:
            key = next(self._ids)
            self._accounts[key] = _Books(label)
            return key

    def _headroom(self, key: int) -> int:
        return self.headroom()

    def _try_charge(self, key: int, nbytes: int) -> bool:
        with self._lock:
            if nbytes and self._limit is not None and self._used_locked() + nbytes > self._limit:
                return False
            self._accounts[key].charged += nbytes
            return True

    def _release(self, key: int, nbytes: int) -> None:
        with self._lock:
            books = self._accounts.get(key)
            if books is None:  # closed meanwhile: close() gave the bytes back
                return
            if nbytes > books.charged:
                raise ValueError(f"nbytes={nbytes} is more than account {books.label!r} holds ({books.charged})")
            books.charged -= nbytes

    def _report(self, key: int, used: int, retained: int) -> None:
        books = self._accounts.get(key)
        if books is not None:  # no lock: each assignment is atomic, and a report needs no more
            books.used, books.retained = used, retained

    def _close(self, key: int) -> None:
        with self._lock:
            self._accounts.pop(key, None)

    def __repr__(self) -> str:
        return f"MemoryBudget(limit={self._limit!r})"

"""BudgetAccount and the contract every budget keeps (Budget); the books live in the subclasses."""

from __future__ import annotations

import operator
import threading
from abc import ABC, abstractmethod
from dataclasses import dataclass

from ..units import parse_size

#: ``headroom()`` of a budget without a limit (the largest int64, so it fits any ledger field).
UNLIMITED = (1 << 63) - 1


def checked_limit(limit: int | str | None) -> int | None:
    """``limit`` in bytes (``None`` = unlimited); ``ValueError`` naming ``limit`` otherwise."""
    if limit is None:
        return None
    nbytes = parse_size(limit, "limit")
    if not 0 <= nbytes <= UNLIMITED:
        raise ValueError(f"limit={limit!r} must be between 0 and {UNLIMITED} bytes")
    return nbytes


def checked_nbytes(nbytes: int) -> int:
    """``nbytes`` as a non-negative int; ``ValueError`` naming ``nbytes`` otherwise."""
    try:
        value = operator.index(nbytes)
    except TypeError:
        raise ValueError(f"nbytes={nbytes!r} is not a whole number of bytes") from None
    if value < 0:
        raise ValueError(f"nbytes={nbytes} must be >= 0")
    return value


def checked_label(label: str, max_bytes: int = 64) -> str:
    if not isinstance(label, str) or not label or len(label.encode()) > max_bytes:
        raise ValueError(f"label={label!r} must be a non-empty string of at most {max_bytes} bytes (UTF-8)")
    return label


@dataclass(frozen=True)
class AccountRow:
    """One account as ``python -m pyvattn top`` shows it (bytes)."""

    pid: int
    label: str
    charged: int
    used: int
    retained: int
    alive: bool = True


class Budget(ABC):
    """Bytes of memory shared by accounts: the sum of what they hold never passes ``limit``.

    Subclasses keep the books (:class:`MemoryBudget` in this process, :class:`SharedBudget` across
    processes) and implement the ``_*`` methods, each atomic with respect to every other account.
    ``limit`` may be lowered below what the accounts hold: nothing is taken back, ``headroom()``
    is 0 and every charge fails until releases bring the use under the new limit.
    """

    @property
    @abstractmethod
    def limit(self) -> int | None:
        """The limit in bytes, ``None`` when unlimited."""

    @abstractmethod
    def set_limit(self, nbytes: int | str | None) -> None:
        """Change the limit (``None``: unlimited) at once for every account; allowed below ``used()``."""

    @abstractmethod
    def used(self) -> int:
        """Bytes charged by every account together."""

    @abstractmethod
    def rows(self) -> list[AccountRow]:
        """A snapshot of the accounts, for ``top`` and tests."""

    def headroom(self) -> int:
        """Bytes any account may still charge now (``UNLIMITED`` without a limit)."""
        limit = self.limit
        return UNLIMITED if limit is None else max(0, limit - self.used())

    def open_account(self, label: str) -> BudgetAccount:
        """A new account, named ``label`` (e.g. the cache's model) in ``top``."""
        return BudgetAccount(self, self._open(checked_label(label)), label)

    @abstractmethod
    def _open(self, label: str) -> object: ...
    @abstractmethod
    def _headroom(self, key: object) -> int: ...
    @abstractmethod
    def _try_charge(self, key: object, nbytes: int) -> bool: ...
    @abstractmethod
    def _release(self, key: object, nbytes: int) -> None: ...
    @abstractmethod
    def _report(self, key: object, used: int, retained: int) -> None: ...
    @abstractmethod
    def _close(self, key: object) -> None: ...


class BudgetAccount:
    """One cache's share of a :class:`Budget`, from ``budget.open_account(label)``.

    * ``try_charge(n)`` takes ``n`` bytes if the budget has them, all or nothing, and says whether it did.
    * ``release(n)`` gives back ``n`` bytes this account charged; more than it holds is a
      ``ValueError`` and changes nothing.
    * ``report(used=, retained=)`` records what the bytes are doing, for ``top``; it is cheap
      (no lock across processes) and is not checked against ``charged``.
    * ``close()`` gives back everything the account holds; it is idempotent. After it ``try_charge``
      raises, and ``release``/``report`` do nothing, so a cache may tear down in any order.
    Thread-safe: every call is atomic against every other account of the same budget.
    """

    def __init__(self, budget: Budget, key: object, label: str):
        self.budget = budget
        self.label = label
        self._key = key
        self._closed = False
        self._lock = threading.Lock()  # makes close() once-only against a racing call

    @property
    def closed(self) -> bool:
        return self._closed

    def headroom(self) -> int:
        """Bytes this account may still charge now."""
        self._check_open()
        return self.budget._headroom(self._key)

    def try_charge(self, nbytes: int) -> bool:
        nbytes = checked_nbytes(nbytes)
        self._check_open()
        return self.budget._try_charge(self._key, nbytes)

    def release(self, nbytes: int) -> None:
        nbytes = checked_nbytes(nbytes)
        if not self._closed:
            self.budget._release(self._key, nbytes)

    def report(self, *, used: int, retained: int) -> None:
        if not self._closed:
            self.budget._report(self._key, used, retained)

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self.budget._close(self._key)

    def __enter__(self) -> BudgetAccount:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError(f"budget account {self.label!r} is closed")

    def __repr__(self) -> str:
        return f"<BudgetAccount {self.label!r}{' closed' if self._closed else ''} of {self.budget!r}>"

"""SharedBudget: one limit shared by the caches of several processes on one machine."""

from __future__ import annotations

import os
import re
import weakref
from pathlib import Path

import numpy as np

from ..errors import BudgetLimitConflict, LedgerFull
from .account import UNLIMITED, AccountRow, Budget, BudgetAccount, checked_limit
from .ledger import LABEL_BYTES, NO_LIMIT, SLOTS, Ledger, pid_namespace, start_time

PREFIX = "pyvattn-"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


def ledger_dir() -> Path:
    """Where ledgers live: ``$PYVATTN_BUDGET_DIR``, else ``/dev/shm`` (shared memory, so a ledger
    costs no disk). Processes share a budget only if they see the same directory."""
    return Path(os.environ.get("PYVATTN_BUDGET_DIR") or "/dev/shm")


def ledger_path(name: str) -> Path:
    """Where the ledger of ``name`` lives; ``ValueError`` naming ``name`` if it is not a plain name."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ValueError(f"name={name!r} must be 1-64 letters, digits, '_', '.' or '-', starting with a "
                         f"letter or digit")
    return ledger_dir() / f"{PREFIX}{name}"


def ledger_names() -> list[str]:
    """Names of the ledgers on this machine."""
    names = (p.name[len(PREFIX):] for p in ledger_dir().glob(f"{PREFIX}*"))
    return sorted(name for name in names if _NAME.fullmatch(name))


class SharedBudget(Budget):
    """A limit that the caches of several processes grow within together, kept in a small ledger
    in shared memory (``/dev/shm/pyvattn-<name>``; ``$PYVATTN_BUDGET_DIR`` instead of ``/dev/shm``
    if set) that every process maps.

    Opening: the first process creates the ledger with ``limit`` (``None``: unlimited). Later
    processes attach; ``limit=None`` or the ledger's own limit attaches, any other limit raises
    :class:`BudgetLimitConflict` (change a running limit with ``set_limit``, which every process
    sees at its next charge). ``create=False`` raises :class:`LedgerNotFound` instead of creating.

    Processes that end: one that exits, or drops the budget unclosed, gives its slots back at once.
    One that is killed leaves them behind; they are reclaimed (their charge returned to the
    budget) when a process opens the ledger, when a charge would otherwise fail, when
    ``headroom()`` would answer 0, and by ``reap()``. A process is its pid plus its start time, so
    a reused pid does not keep a dead share alive. Processes must see each other's pids: slots
    opened from another pid namespace are never reclaimed from this one.

    ``set_limit`` below ``used()`` is allowed: it takes nothing back, it makes ``headroom()`` 0 and
    every charge fail until releases bring the use under the new limit. At most
    ``SLOTS`` (128) accounts are open at once (:class:`LedgerFull` after that). An account works
    only in the process that opened it. The ledger outlives its processes; ``remove(name)``
    deletes it.
    """

    def __init__(self, name: str, limit: int | str | None = None, *, create: bool = True):
        path = ledger_path(name)
        limit = checked_limit(limit)
        self.name = name
        self._accounts: list[BudgetAccount] = []
        self._keys: set[tuple[int, int]] = set()  # (slot, pid) of the accounts open through this object
        self._me = self._identity()
        self._ledger = Ledger(path, create=create, limit=limit)
        try:
            with self._ledger.locked():
                have = self.limit
                if limit is not None and have != limit:
                    raise BudgetLimitConflict(
                        f"limit={limit} but budget {name!r} has limit {have}: open it with limit=None to "
                        f"attach, or change it with set_limit()")
                self._reap_locked()
        except BaseException:
            self._ledger.close()
            raise
        # At exit, or when dropped unclosed, the slots go back at once rather than when reaped.
        self._finalizer = weakref.finalize(self, _give_back, self._ledger, self._keys)

    @property
    def path(self) -> Path:
        return self._ledger.path

    @staticmethod
    def remove(name: str) -> bool:
        """Delete the ledger of ``name`` (whether or not it existed: the answer). Processes still
        attached keep the old one, shared by none that open the name afterwards: remove a ledger
        only when no process uses it."""
        try:
            ledger_path(name).unlink()
            return True
        except FileNotFoundError:
            return False

    # --- the limit and the total -----------------------------------------------------------------
    @property
    def limit(self) -> int | None:
        self._ledger.check_open()
        limit = int(self._ledger.limit)
        return None if limit == NO_LIMIT else limit

    def set_limit(self, nbytes: int | str | None) -> None:
        limit = checked_limit(nbytes)
        with self._ledger.locked():
            self._ledger.limit[()] = NO_LIMIT if limit is None else limit

    def used(self) -> int:
        with self._ledger.locked():
            return self._used_locked()

    def _used_locked(self) -> int:
        return int(self._ledger.charged.sum())

    def rows(self) -> list[AccountRow]:
        with self._ledger.locked():
            taken = np.flatnonzero(self._ledger.pid != 0)
            dead = set(self._dead_locked())
            rows = self._ledger.slots[taken].copy()
        return [AccountRow(int(s["pid"]), s["label"].decode(errors="replace"), int(s["charged"]), int(s["used"]),
                           int(s["retained"]), alive=i not in dead) for i, s in zip(taken.tolist(), rows)]

    def reap(self) -> int:
        """Reclaim the slots of processes that are gone; the number reclaimed."""
        with self._ledger.locked():
            return self._reap_locked()

    def _identity(self) -> tuple[int, int, int]:
        """This process: (pid, start time, pid namespace), found anew in a forked child."""
        pid = os.getpid()
        if getattr(self, "_me", (None,))[0] != pid:
            self._me = (pid, start_time(pid) or 0, pid_namespace())
        return self._me

    def _dead_locked(self) -> list[int]:
        """Slots whose process is gone. One /proc read per other live pid (~15 us each); slots
        of another pid namespace are skipped, their pids mean nothing here."""
        me, my_start, my_ns = self._identity()
        slots = self._ledger.slots
        started = {me: my_start}
        dead = []
        taken = np.flatnonzero(self._ledger.pid != 0)
        for i, pid, slot_start, ns in zip(taken.tolist(), slots["pid"][taken].tolist(),
                                          slots["start_time"][taken].tolist(), slots["pid_ns"][taken].tolist()):
            if ns != my_ns:
                continue
            if pid not in started:
                started[pid] = start_time(pid)
            if started[pid] != slot_start:
                dead.append(i)
        return dead

    def _reap_locked(self) -> int:
        dead = self._dead_locked()
        self._ledger.slots[dead] = 0
        return len(dead)

    # --- accounts --------------------------------------------------------------------------------
    def open_account(self, label: str) -> BudgetAccount:
        account = super().open_account(label)
        self._accounts = [a for a in self._accounts if not a.closed] + [account]
        return account

    def _open(self, label: str) -> tuple[int, int]:
        pid, started, ns = self._identity()
        with self._ledger.locked():
            free = self._ledger.pid == 0
            if not free.any() and self._reap_locked():
                free = self._ledger.pid == 0
            if not free.any():
                raise LedgerFull(f"budget {self.name!r}: all {SLOTS} accounts are held by live processes")
            index = int(free.argmax())
            self._ledger.slots[index] = (pid, started, ns, 0, 0, 0, label.encode()[:LABEL_BYTES])
            self._keys.add((index, pid))
        return index, pid

    def _index(self, key: tuple[int, int]) -> int:
        index, pid = key
        if pid != os.getpid():
            raise RuntimeError(f"this budget account was opened by process {pid}; a forked process opens its own")
        return index

    def _headroom(self, key: tuple[int, int]) -> int:
        self._index(key)
        return self.headroom()

    def headroom(self) -> int:
        with self._ledger.locked():
            room = self._headroom_locked()
            if room == 0 and self._reap_locked():
                room = self._headroom_locked()
            return room

    def _headroom_locked(self) -> int:
        limit = int(self._ledger.limit)
        return UNLIMITED if limit == NO_LIMIT else max(0, limit - self._used_locked())

    def _try_charge(self, key: tuple[int, int], nbytes: int) -> bool:
        index = self._index(key)
        with self._ledger.locked():
            if nbytes > self._headroom_locked() and not (self._reap_locked() and nbytes <= self._headroom_locked()):
                return False
            self._ledger.charged[index] += nbytes
            return True

    def _release(self, key: tuple[int, int], nbytes: int) -> None:
        index = self._index(key)
        with self._ledger.locked():
            held = int(self._ledger.charged[index])
            if nbytes > held:
                label = self._ledger.slots[index]["label"].decode(errors="replace")
                raise ValueError(f"nbytes={nbytes} is more than account {label!r} holds ({held})")
            self._ledger.charged[index] = held - nbytes

    def _report(self, key: tuple[int, int], used: int, retained: int) -> None:
        if key[1] == os.getpid():  # no lock: aligned 8-byte stores, and top needs no more
            slots = self._ledger.slots
            slots["used"][key[0]], slots["retained"][key[0]] = used, retained

    def _close(self, key: tuple[int, int]) -> None:
        if key[1] != os.getpid() or self._ledger.closed:
            return  # a forked child's copy of its parent's account, or the ledger already closed
        with self._ledger.locked():
            self._ledger.slots[key[0]] = 0
            self._keys.discard(key)

    def close(self) -> None:
        """Close this process's accounts of this budget (giving their shares back) and unmap the
        ledger; idempotent. The ledger stays for the other processes."""
        for account in self._accounts:
            account.close()
        self._accounts.clear()
        self._finalizer()

    def __enter__(self) -> SharedBudget:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"SharedBudget({self.name!r}, closed)" if self._ledger.closed else \
            f"SharedBudget({self.name!r}, limit={self.limit!r})"


def _give_back(ledger: Ledger, keys: set[tuple[int, int]]) -> None:
    """Free the slots in ``keys`` that this process opened, then unmap the ledger."""
    mine = [index for index, pid in keys if pid == os.getpid()]
    try:
        if mine and not ledger.closed:
            with ledger.locked():
                for index in mine:
                    ledger.slots[index] = 0
        keys.clear()
    finally:
        ledger.close()

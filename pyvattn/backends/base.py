"""The contract every physical-memory provider implements, and everything the providers share.

A backend does five things on one device, at one page size: reserve ranges of virtual addresses,
create physical pages (opaque integer handles), map pages at virtual addresses and unmap them,
release pages, and give a zero-copy torch view of a range. The host, cuda-vmm and uvm64k backends
implement only the driver calls (``_reserve``, ``_create``, ``_map``, ``_unmap``, ``_release``...);
this module does, once for all of them:

* **the books.** :class:`Backend` is the only owner of what exists and what is mapped: the handle at
  every page of every reservation (``-1``: none), the handles alive, and every VA each handle is
  mapped at (a page may be mapped at several: mappings are reference-counted).
  Everything above it (``VirtualBuffer``, ``PagePool``, ``KVCache``) asks it. After any
  call, whether it returned or raised (``KeyboardInterrupt`` included), the books are what the
  driver did: a failed call records exactly the steps that happened and were not taken back.
* **validation**, before any driver call: a backend never sees a bad batch.
* :func:`runs`, the one run-finder: a batch sorted by VA and cut where pages stop being contiguous.
* :class:`Undo`, the one rollback discipline: steps pushed as they succeed, taken back newest first
  when a later one fails, the first error kept, what could not be undone reported (and booked).
* **closing**: unmap, release and unreserve everything, trying every step, raising the first error.
  A reservation some tensor still views is not given back: it is sealed (on the host: no access) and
  handed to a graveyard until the last view dies, so a new reservation cannot reuse its addresses
  under a stale tensor (which would then write into someone else's memory).

Driver calls are the unit of failure: each either happens or raises. Python may deliver a
``KeyboardInterrupt`` between any two bytecodes; one that lands after a driver call returned and
before the next statement is outside what any Python code can account for.
"""

from __future__ import annotations

import abc
import os
import threading
import warnings
import weakref
from dataclasses import dataclass
from typing import Callable, ClassVar, Sequence

import numpy as np
import torch

from .._ffi.dlpack import Watch, watched
from ..errors import DriverError, OutOfPages, note_cleanup_failure

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30

UNMAPPED = -1  # the books' entry for a page with nothing mapped


@dataclass(frozen=True)
class Probe:
    """Whether a backend can run on a device here, and why (or why not)."""

    available: bool
    reason: str


@dataclass(frozen=True)
class Runs:
    """A batch of pages sorted by VA and cut into runs (see :func:`runs`).

    ``vas``/``handles`` are in VA order; run ``i`` is ``vas[starts[i] : starts[i] + lengths[i]]``.
    """

    vas: np.ndarray
    handles: np.ndarray | None
    starts: np.ndarray
    lengths: np.ndarray

    def __len__(self) -> int:
        return len(self.starts)

    def spans(self) -> list[tuple[int, int]]:
        """``(first_va, pages)`` of every run."""
        return list(zip(self.vas[self.starts].tolist(), self.lengths.tolist()))


def runs(vas, step: int, handles=None, handle_step: int | None = None) -> Runs:
    """Sort ``vas`` (and ``handles`` alike) and cut the batch where the VA stops advancing by
    ``step`` or, with ``handle_step``, where the handle stops advancing by ``handle_step`` (the
    host's memfd offsets: such a run is one ``mmap``). Vectorised: a 16,384-page batch costs about
    as much as 20 pages' worth of Python loop (``scripts/bench_host.py``, "runs()")."""
    v = np.asarray(vas, dtype=np.int64)
    order = np.argsort(v, kind="stable")
    v = v[order]
    cut = np.diff(v) != step
    h = None
    if handles is not None:
        h = np.asarray(handles, dtype=np.int64)[order]
        if handle_step is not None:
            cut |= np.diff(h) != handle_step
    starts = np.flatnonzero(np.concatenate(([True], cut))) if len(v) else np.zeros(0, np.int64)
    lengths = np.diff(np.append(starts, len(v)))
    return Runs(v, h, starts, lengths)


class Undo:
    """The one rollback discipline, for every backend call and every ``close()``.

    A call that changes driver state in several steps ``push``es, after each step that succeeded,
    how to take it back (``fn(items)`` undoes ``items``: VAs, handles, ranges). When a later step
    fails, ``rollback(exc)`` takes every pushed step back, newest first, trying all of them even
    when one fails; ``exc`` stays the error the caller sees, with the first clean-up failure noted
    on it (``exc.cleanup_error``). ``undone`` and ``kept`` say which items were taken back and
    which are still in effect (the caller books those as real).

    ``attempt(fn, *args)`` is the same discipline for teardown: run a step, go on if it fails;
    ``raise_first()`` at the end raises the first failure.
    """

    def __init__(self):
        self._steps: list[tuple[Callable, list]] = []
        self.undone: list = []
        self.kept: list = []
        self.errors: list[BaseException] = []

    def push(self, fn: Callable, items: list) -> None:
        self._steps.append((fn, items))

    def attempt(self, fn: Callable, *args) -> bool:
        """Run ``fn(*args)``; True if it returned. A failure (even ``KeyboardInterrupt``) is kept
        for ``raise_first`` and does not stop the steps after it."""
        try:
            fn(*args)
        except BaseException as exc:  # noqa: BLE001 - clean-up goes on; the error is re-raised later
            self.errors.append(exc)
            return False
        return True

    def rollback(self, exc: BaseException) -> list:
        """Take back every pushed step (newest first); return the items that are still in effect."""
        while self._steps:
            fn, items = self._steps.pop()
            (self.undone if self.attempt(fn, items) else self.kept).extend(items)
        if self.errors:
            note_cleanup_failure(exc, "taking back what this call did", self.errors[0])
        return self.kept

    def error_for(self, exc: BaseException) -> BaseException:
        """What to raise after ``rollback(exc)``: ``exc``, unless a ``KeyboardInterrupt`` (or
        another non-``Exception``) arrived during the clean-up: the user's Ctrl-C wins."""
        for err in self.errors:
            if not isinstance(err, Exception):
                return err
        return exc

    def raise_first(self) -> None:
        if self.errors:
            first = self.errors[0]
            for later in self.errors[1:]:
                note_cleanup_failure(first, "a later clean-up step", later)
            raise first


def undo_one(exc: BaseException, fn: Callable, *args) -> BaseException:
    """:class:`Undo` for a single step: take back ``fn(*args)`` after ``exc``; return what to raise."""
    undo = Undo()
    undo.push(lambda _: fn(*args), [])
    undo.rollback(exc)
    return undo.error_for(exc)


class Backend(abc.ABC):
    """Physical pages of one size, on one device, and the virtual ranges they map into.

    Contract of the public methods (implemented here once; backends implement the ``_`` hooks):

    * ``page_size`` is a multiple of ``granularity``. Every VA passed to ``map``/``unmap`` lies in
      one reservation and is page-aligned relative to its base; every batch is checked whole before
      any driver call (``ValueError`` naming the argument, nothing changed).
    * ``create_pages`` and ``map`` are all or nothing: on error nothing was created or mapped (the
      steps done before the failure were taken back), and the error is ``OutOfPages`` when memory
      ran out, else a ``DriverError`` naming the driver status. If taking a step back fails too,
      the error says so (``cleanup_error``) and the books keep that step as done.
    * ``unmap`` and ``release_pages`` that fail part-way leave done what was done and book it
      (a ``DriverError`` from ``unmap`` lists those pages in ``unmapped_vas``).
    * ``map`` returns once the mapping is live for the device (populated, on the host); ``unmap``
      returns once no work issued before it can still touch the pages.
    * Mappings are reference-counted: a live handle may be mapped at several VAs at once (prefix
      sharing: the same physical page under two requests' slabs, asked for with ``share=True``),
      up to ``max_mappings`` (None: no limit) on backends whose driver caps it. ``refs(handles)``
      says how many; only a handle mapped nowhere may be released, and ``unmap`` returns the
      handles whose last mapping it removed (the ones a pool may take back).
    * ``close`` releases everything; reservations still viewed by a tensor stay reserved and
      sealed until their last view dies (see the module docstring).
    """

    #: Name used by ``backend=`` and ``python -m pyvattn info``.
    name: ClassVar[str]
    #: Pages whose handles advance by ``page_size`` along a VA run map in one driver call (host:
    #: handles are memfd offsets); otherwise runs are cut by VA only.
    handles_are_offsets: ClassVar[bool] = False
    #: The most VAs one page may be mapped at (None: no limit); set by backends whose driver caps it.
    max_mappings: int | None = None

    def __init__(self, device: torch.device, page_size: int):
        self.device = torch.device(device)
        self.page_size = int(page_size)
        self._tables: dict[int, np.ndarray] = {}  # reservation base -> handle at each page
        self._counts: dict[int, int] = {}  # reservation base -> pages mapped in it
        self._live: set[int] = set()  # handles created and not released
        self._where: dict[int, int] = {}  # mapped handle -> a VA it is mapped at
        self._also: dict[int, list[int]] = {}  # shared handle -> the VAs it is mapped at besides
        self._orphans: set[int] = set()  # live handles a failed rollback left behind (freed at close)
        self._watches: dict[int, list[Watch]] = {}  # reservation base -> its tensors' lifetimes
        self.has_shared = False  # a page was once mapped at a second VA (placement may name a busy page)
        self._sealed: dict[int, tuple[int, list[Watch]]] = {}  # given back while viewed: base -> (nbytes, watches)
        self._closed = False
        self._shut = False
        self._pid = os.getpid()  # the process whose pages these are
        self._forked = False  # set in a forked child: the pages and fds are the parent's
        _backends.add(self)

    # --- discovery -------------------------------------------------------------------------
    @classmethod
    @abc.abstractmethod
    def probe(cls, device: torch.device) -> Probe:
        """Say whether this backend can serve ``device`` here, without side effects that last."""

    @classmethod
    @abc.abstractmethod
    def granularity(cls, device: torch.device) -> int:
        """Smallest page size (bytes) this backend maps on ``device``; page sizes are multiples."""

    @classmethod
    def default_page_size(cls, device: torch.device) -> int:
        """Page size used when ``page_size="auto"``."""
        return cls.granularity(device)

    @classmethod
    def check_page_size(cls, device: torch.device, page_size: int) -> None:
        """Raise ``ValueError`` naming ``page_size`` if this backend cannot map pages of that size."""
        gran = cls.granularity(device)
        if page_size <= 0 or page_size % gran:
            raise ValueError(
                f"page_size={page_size} is not a positive multiple of the {cls.name} backend's "
                f"granularity ({gran} bytes) on {device}"
            )

    def describe(self) -> dict:
        """Facts for ``stats()`` and ``info``: backend name, device, page size, driver version..."""
        return {"backend": self.name, "device": str(self.device), "page_size": self.page_size}

    def mapping_room(self) -> int | None:
        """How many more separate mappings this process may make (the host's ``vm.max_map_count``
        headroom), or None where the backend has no such limit."""
        return None

    # --- the books ---------------------------------------------------------------------------
    @property
    def mapped_pages(self) -> int:
        """Pages mapped (VAs with a page under them), over all reservations."""
        return len(self._where) + sum(map(len, self._also.values()))

    @property
    def mapped_handles(self) -> int:
        """Physical pages mapped somewhere (a page mapped at several VAs counts once)."""
        return len(self._where)

    def refs(self, handles) -> np.ndarray:
        """For each handle: how many VAs it is mapped at (0: none)."""
        where, also = self._where, self._also
        if isinstance(handles, np.ndarray):
            handles = handles.tolist()
        return np.fromiter(((h in where) + len(also.get(h, ())) for h in handles), dtype=np.int64,
                           count=len(handles))

    def mapped_pages_in(self, base: int) -> int:
        """Pages mapped in the reservation at ``base``."""
        return self._counts.get(base, 0)

    def mapped_vas(self, base: int) -> np.ndarray:
        """The VAs of every page mapped in the reservation at ``base``."""
        return base + np.flatnonzero(self._tables[base] != UNMAPPED) * self.page_size

    def handles_at(self, vas) -> np.ndarray:
        """The handle mapped at each of ``vas`` (``-1`` where none); VAs in one reservation."""
        vas = _int64(vas, "vas")
        if not len(vas):
            return np.zeros(0, np.int64)
        _, table, idx = self._locate(vas)
        return table[idx]

    def books(self) -> dict:
        """A copy of the books, for checks and debugging: ``mapped`` {va: handle}, ``live``
        (handles created and not released) and ``orphans`` (live handles a failed rollback left
        behind, released at close)."""
        mapped = {va: h for h, va in self._where.items()}
        mapped.update((va, h) for h, vas in self._also.items() for va in vas)
        return {"mapped": mapped, "live": set(self._live), "orphans": set(self._orphans)}

    @property
    def orphan_pages(self) -> int:
        """How many live pages a failed rollback left behind (see ``adopt_orphans``)."""
        return len(self._orphans)

    def adopt_orphans(self) -> list[int]:
        """Hand over the pages a failed rollback left created (live, and nobody's): the caller owns
        them from now on (the pool takes them in the next time it needs pages)."""
        orphans, self._orphans = list(self._orphans), set()
        return orphans

    def is_live(self, handles) -> np.ndarray:
        """For each handle: created by this backend and not released."""
        live = self._live
        if isinstance(handles, np.ndarray):
            handles = handles.tolist()
        return np.fromiter((h in live for h in handles), dtype=bool, count=len(handles))

    def placement(self, vas) -> np.ndarray | None:
        """The handle each of ``vas`` should get so that neighbouring pages merge into one mapping
        (host: the memfd offset that follows the VA), or None where any page does as well."""
        return None

    # --- virtual ranges ----------------------------------------------------------------------
    def reserve(self, nbytes: int) -> int:
        """Reserve ``nbytes`` (a positive multiple of ``page_size``) of virtual addresses; return the
        base, aligned to at least ``page_size`` (2 MiB where the device can use it)."""
        self._check_open()
        if isinstance(nbytes, bool) or not isinstance(nbytes, (int, np.integer)) or nbytes <= 0 \
                or nbytes % self.page_size:
            raise ValueError(f"nbytes={nbytes} is not a positive multiple of page_size={self.page_size}")
        nbytes = int(nbytes)
        graveyard.sweep()
        base = self._reserve(nbytes)
        try:
            self._tables[base] = np.full(nbytes // self.page_size, UNMAPPED, dtype=np.int64)
            self._counts[base] = 0
        except BaseException as exc:
            raise undo_one(exc, self._unreserve, base, nbytes)
        return base

    def unreserve(self, base: int, nbytes: int) -> None:
        """Give back a reservation; every page in it must be unmapped. If a tensor view of it is
        still alive, the range stays reserved and sealed until that view dies."""
        table = self._tables.get(base)
        if table is None or len(table) * self.page_size != nbytes:
            raise ValueError(f"base={base:#x} nbytes={nbytes} is not a live reservation")
        if (table != UNMAPPED).any():
            raise ValueError(f"reservation {base:#x} still has mapped pages; unmap them first")
        watches = [w for w in self._watches.pop(base, []) if w.alive()]
        del self._tables[base], self._counts[base]
        if not watches:
            self._unreserve(base, nbytes)
            return
        self._sealed[base] = (nbytes, watches)
        graveyard.add(self)
        self._seal(base, nbytes)

    def view(self, base: int, nbytes: int) -> torch.Tensor:
        """A zero-copy 1-D ``uint8`` tensor over a reservation; the backend watches it (and every
        view of it), so the range is not reused while any of them is alive."""
        if base not in self._tables:
            raise ValueError(f"base={base:#x} is not a live reservation")
        raw = self.tensor(base, nbytes)
        tensor, watch = watched(raw)
        self._watches.setdefault(base, []).append(watch)
        return tensor

    # --- physical pages ----------------------------------------------------------------------
    def create_pages(self, count: int, at=None) -> list[int]:
        """Create ``count`` physical pages; return their handles. ``at`` (from :meth:`placement`)
        asks for exactly those handles, on backends that place pages."""
        self._check_open()
        if isinstance(count, bool) or not isinstance(count, (int, np.integer)) or count < 0:
            raise ValueError(f"count={count!r} must be an integer >= 0")
        count = int(count)
        if at is not None:
            at = _int64(at, "at")
            if len(at) != count or len(np.unique(at)) != count or self.is_live(at).any():
                raise ValueError("at: must be `count` distinct handles that are not live")
        if count == 0:
            return []
        undo = Undo()
        try:
            handles = self._create(count, at, undo)
        except BaseException as exc:
            kept = undo.rollback(exc)  # created, and releasing them again failed: still real
            self._live.update(kept)
            self._orphans.update(kept)
            raise self._typed(undo, exc, f"creating {count} pages of {self.page_size} bytes", count)
        self._live.update(handles)
        return handles

    def release_pages(self, handles: Sequence[int]) -> None:
        """Give unmapped pages back to the OS / driver."""
        self._check_open()
        handles = [int(h) for h in handles]
        bad = [h for h in handles if h not in self._live or h in self._where]
        if bad or len(set(handles)) != len(handles):
            raise ValueError(f"handles {bad[:4] or 'given twice'} are not live, unmapped pages of this backend")
        if handles:
            self._release_all(handles)

    # --- mapping -----------------------------------------------------------------------------
    def map(self, vas: Sequence[int], handles: Sequence[int], *, share: bool = False) -> None:
        """Map ``handles[i]`` at ``vas[i]`` for every i, in as few driver calls as possible. A
        handle already mapped elsewhere is refused unless ``share`` (a second mapping of the same
        page is then what the caller means: prefix sharing)."""
        self._check_open()
        vas, handles = _int64(vas, "vas"), _int64(handles, "handles")
        if len(vas) != len(handles):
            raise ValueError(f"len(vas)={len(vas)} != len(handles)={len(handles)}")
        if not len(vas):
            return
        base, table, idx = self._locate(vas)
        batch = runs(vas, self.page_size, handles, self.page_size if self.handles_are_offsets else None)
        if (np.diff(batch.vas) == 0).any():
            raise ValueError("vas: duplicates in one batch")
        if (table[idx] != UNMAPPED).any():
            raise ValueError("vas: some are already mapped")
        wanted = set(handles.tolist())
        if len(wanted) != len(handles) or not self._live.issuperset(wanted):
            raise ValueError("handles: some are not live, distinct pages of this backend")
        if not share and not wanted.isdisjoint(self._where):
            raise ValueError("handles: some are already mapped (share=True maps a page at a second VA)")
        if share and self.max_mappings is not None and (self.refs(handles) >= self.max_mappings).any():
            raise ValueError(f"handles: some are already mapped at {self.max_mappings} VAs, the most the "
                             f"{self.name} driver allows for one page")
        self.has_shared |= share
        undo = Undo()
        try:
            self._map(batch, undo)
        except BaseException as exc:
            still = np.asarray(undo.rollback(exc), dtype=np.int64)  # VAs mapped and not taken back
            if len(still):
                self._book(base, table, (still - base) // self.page_size,
                           batch.handles[np.searchsorted(batch.vas, still)])
            raise self._typed(undo, exc, f"mapping {len(vas)} pages", len(vas))
        self._book(base, table, (batch.vas - base) // self.page_size, batch.handles)

    def unmap(self, vas: Sequence[int]) -> list[int]:
        """Unmap the pages at ``vas``; their handles stay alive for reuse. Returns the handles
        whose last mapping went (each once): a page still mapped elsewhere is not among them."""
        self._check_open()
        vas = _int64(vas, "vas")
        if not len(vas):
            return []
        base, table, idx = self._locate(vas)
        batch = runs(vas, self.page_size)
        if (np.diff(batch.vas) == 0).any():
            raise ValueError("vas: duplicates in one batch")
        missing = vas[table[idx] == UNMAPPED]
        if len(missing):
            raise ValueError(f"vas: {[hex(v) for v in missing[:4].tolist()]} are not mapped")
        return self._unmap_batch(base, table, batch)

    def _unmap_batch(self, base: int, table: np.ndarray, batch: Runs) -> list[int]:
        done: list[tuple[int, int]] = []  # (first VA, pages) of every driver call that succeeded
        try:
            self._unmap(batch, done)
        except BaseException as exc:
            gone = np.array([va + k * self.page_size for va, n in done for k in range(n)], dtype=np.int64)
            self._unbook(base, table, (gone - base) // self.page_size)
            if isinstance(exc, DriverError):
                exc.unmapped_vas = gone.tolist()
            raise
        return self._unbook(base, table, (batch.vas - base) // self.page_size)

    # --- lifetime ----------------------------------------------------------------------------
    def close(self) -> None:
        """Unmap, release and give back everything (reservations still viewed stay sealed until
        their views die). Idempotent; every step is tried, the first error is raised."""
        if self._closed:
            return  # a forked child's copy lands here too: the parent owns the memory
        self._closed = True
        if os.getpid() != self._pid:  # forked by a path that skipped the at-fork hooks
            self._forked = self._shut = True
            return
        cleanup = Undo()
        for base, table in list(self._tables.items()):
            vas = self.mapped_vas(base)
            if len(vas):
                cleanup.attempt(self._unmap_batch, base, table, runs(vas, self.page_size))
            cleanup.attempt(self._close_reservation, base, len(table) * self.page_size)
        idle = [h for h in self._live if h not in self._where]
        if idle:
            cleanup.attempt(self._release_all, idle)
        if not self._sealed:
            cleanup.attempt(self._shutdown_once)
        cleanup.errors = [e for e in cleanup.errors if not self._driver_gone(e)]
        graveyard.sweep()
        cleanup.raise_first()

    def _close_reservation(self, base: int, nbytes: int) -> None:
        if (self._tables[base] == UNMAPPED).all():
            self.unreserve(base, nbytes)

    def _release_all(self, handles: list[int]) -> None:
        """Release ``handles`` (checked); the books follow what was released, whatever happens."""
        done: list[int] = []
        try:
            self._release(handles, done)
        finally:
            self._live.difference_update(done)
            self._orphans.difference_update(done)

    def _shutdown_once(self) -> None:
        if not self._shut:
            self._shut = True
            self._shutdown()

    def _bury_sealed(self) -> bool:
        """Give back sealed reservations whose views all died; shut down once none is left.
        True when nothing is left to wait for."""
        for base, (nbytes, watches) in list(self._sealed.items()):
            if any(w.alive() for w in watches):
                continue
            self._unreserve(base, nbytes)
            del self._sealed[base]
        if self._sealed:
            return False
        if self._closed:
            self._shutdown_once()
        return True

    @property
    def closed(self) -> bool:
        return self._closed

    def _check_open(self) -> None:
        if self._forked or os.getpid() != self._pid:
            raise RuntimeError(f"this {self.name} backend belongs to the parent process: a forked child "
                               f"must not use it (its pages are shared with the parent)")
        if self._closed:
            raise RuntimeError(f"this {self.name} backend is closed")

    # --- helpers -----------------------------------------------------------------------------
    def _locate(self, vas: np.ndarray) -> tuple[int, np.ndarray, np.ndarray]:
        """(reservation base, its table, page indices) for VAs that all lie in one reservation."""
        lo, hi = int(vas.min()), int(vas.max())
        P = self.page_size
        for base, table in self._tables.items():
            if base <= lo and hi + P <= base + len(table) * P:
                offset = vas - base
                if (offset % P).any():
                    bad = int(vas[(offset % P) != 0][0])
                    raise ValueError(f"vas: {bad:#x} is not page-aligned in its reservation")
                return base, table, offset // P
        raise ValueError(f"vas: [{lo:#x}, {hi + P:#x}) is not inside a reservation of this backend")

    def _book(self, base: int, table: np.ndarray, pages: np.ndarray, handles: np.ndarray) -> None:
        table[pages] = handles
        self._counts[base] += len(pages)
        hs, vas = handles.tolist(), (base + pages * self.page_size).tolist()
        where = self._where
        if where.keys().isdisjoint(hs):  # the common case: no page mapped twice, one C-level update
            where.update(zip(hs, vas))
            return
        for h, va in zip(hs, vas):
            if h in where:
                self._also.setdefault(h, []).append(va)
            else:
                where[h] = va

    def _unbook(self, base: int, table: np.ndarray, pages: np.ndarray) -> list[int]:
        """Take the pages out of the books; return the handles whose last mapping went."""
        where, also, last = self._where, self._also, []
        vas = (base + pages * self.page_size).tolist()
        for h, va in zip(table[pages].tolist(), vas):
            more = also.get(h)
            if more is None:
                del where[h]
                last.append(h)
                continue
            if where[h] == va:
                where[h] = more.pop()
            else:
                more.remove(va)
            if not more:
                del also[h]
        table[pages] = UNMAPPED
        self._counts[base] -= len(pages)
        return last

    def _typed(self, undo: Undo, exc: BaseException, what: str, needed: int) -> BaseException:
        """What a failed create or map raises after its rollback: a Ctrl-C that came during the
        clean-up; else ``OutOfPages`` if ``exc`` says the device or OS ran out of memory; else
        ``exc``."""
        err = undo.error_for(exc)
        if err is exc and isinstance(exc, DriverError) and self._out_of_memory(exc):
            err = OutOfPages(f"{what}: {exc}", needed=needed)
            err.__cause__ = exc
            if getattr(exc, "cleanup_error", None) is not None:
                note_cleanup_failure(err, "taking back what this call did", exc.cleanup_error)
        return err

    # --- what each backend implements -------------------------------------------------------
    @abc.abstractmethod
    def _reserve(self, nbytes: int) -> int:
        """Reserve ``nbytes`` of VA (validated); return the base. All or nothing."""

    @abc.abstractmethod
    def _unreserve(self, base: int, nbytes: int) -> None:
        """Give back a reservation with nothing mapped in it."""

    def _seal(self, base: int, nbytes: int) -> None:
        """Make a given-back reservation that a tensor still views inaccessible (default: nothing
        to do: unmapped device VA faults anyway)."""

    @abc.abstractmethod
    def _create(self, count: int, at: np.ndarray | None, undo: Undo) -> list[int]:
        """Create ``count`` pages (at ``at`` if given); push an undo step after each driver call."""

    @abc.abstractmethod
    def _release(self, handles: list[int], done: list[int]) -> None:
        """Release ``handles`` (validated: live, unmapped); append each released one to ``done``."""

    @abc.abstractmethod
    def _map(self, batch: Runs, undo: Undo) -> None:
        """Map the (validated) batch; after each driver call that succeeded, push its undo with the
        VAs it mapped as items."""

    @abc.abstractmethod
    def _unmap(self, batch: Runs, done: list[tuple[int, int]]) -> None:
        """Unmap the (validated, all mapped) batch; append ``(first_va, pages)`` after each driver
        call that succeeded."""

    def _shutdown(self) -> None:
        """Release what the backend holds beyond pages and ranges (fds, contexts). Called once."""

    def _out_of_memory(self, exc: DriverError) -> bool:
        """Whether ``exc`` means that memory ran out (it then becomes ``OutOfPages``)."""
        return False

    def _driver_gone(self, exc: BaseException) -> bool:
        """Whether ``exc`` in ``close()`` only says the driver has already torn everything down
        (at interpreter exit); such errors are not raised."""
        return False

    # --- access ------------------------------------------------------------------------------
    @abc.abstractmethod
    def tensor(self, base: int, nbytes: int) -> torch.Tensor:
        """A zero-copy 1-D ``uint8`` tensor over ``[base, base+nbytes)`` on ``self.device``. It must
        not own the memory (:meth:`view` watches it)."""

    def synchronize(self) -> None:
        """Wait until work already issued on the device is done (used before unmapping)."""


class _Graveyard:
    """Backends holding reservations that were given back while a tensor still viewed them.
    Swept at every ``reserve()`` (a new range must not reuse a stale tensor's addresses) and
    whenever a sealed reservation is added."""

    def __init__(self):
        self._lock = threading.Lock()
        self._backends: list[Backend] = []

    def add(self, backend: Backend) -> None:
        with self._lock:
            if backend not in self._backends:
                self._backends.append(backend)
        self.sweep()

    def sweep(self) -> None:
        with self._lock:
            waiting = list(self._backends)
        for backend in waiting:
            try:
                done = backend._bury_sealed()
            except Exception as exc:  # someone else's reserve() must not fail for it
                warnings.warn(f"pyvattn: giving back a closed {backend.name} range failed: {exc!r}",
                              ResourceWarning, stacklevel=2)
                done = False
            if done:
                with self._lock:
                    if backend in self._backends:
                        self._backends.remove(backend)

    def __len__(self) -> int:
        with self._lock:
            return len(self._backends)


graveyard = _Graveyard()
_backends: weakref.WeakSet[Backend] = weakref.WeakSet()


def _forget_in_child() -> None:
    """After ``fork()``, in the child: the backends it inherited share their memory (a memfd, a
    UVM fd) with the parent. Releasing or unmapping anything there would take it from the parent,
    so the child's copies are closed without a driver call."""
    for backend in list(_backends):
        backend._forked = backend._closed = backend._shut = True
        backend._sealed.clear()
    graveyard._backends.clear()
    graveyard._lock = threading.Lock()


os.register_at_fork(after_in_child=_forget_in_child)


def _int64(values, name: str) -> np.ndarray:
    """``values`` as a 1-D int64 array (``ValueError`` naming ``name`` otherwise)."""
    try:
        arr = np.asarray(values)
        if arr.size == 0:
            return np.zeros(0, np.int64)
        if arr.ndim != 1 or arr.dtype.kind not in "iu":
            raise TypeError
        return arr.astype(np.int64, copy=False)
    except (TypeError, ValueError, OverflowError):
        raise ValueError(f"{name}: must be a sequence of integers") from None

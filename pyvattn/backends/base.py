"""The interface every physical-memory provider implements.

A backend knows how to do five things on one device, at one page size:

* reserve a range of virtual addresses (no memory behind it),
* create physical pages (opaque integer handles),
* map a batch of pages at given virtual addresses, and unmap a batch,
* release pages,
* give a zero-copy torch view of a reserved range.

Everything above it (``VirtualBuffer``, ``PagePool``, ``KVCache``) is written against this class
only, so the host, cuda-vmm and uvm64k backends are interchangeable.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import ClassVar, Sequence

import numpy as np
import torch

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30


@dataclass(frozen=True)
class Probe:
    """Whether a backend can run on a device here, and why (or why not)."""

    available: bool
    reason: str


class Backend(abc.ABC):
    """Physical pages of one size, on one device, and the virtual ranges they map into.

    Contract shared by all implementations:

    * ``page_size`` is a multiple of ``granularity``; every virtual address passed to ``map`` and
      ``unmap`` is page-aligned and lies inside a range returned by ``reserve``.
    * ``create_pages`` and ``map`` are all-or-nothing: on error nothing was created or mapped, and
      the error is :class:`~pyvattn.errors.OutOfPages` when memory ran out, otherwise a
      :class:`~pyvattn.errors.DriverError` naming the driver status.
    * ``map`` returns once the mapping is live for the device; ``unmap`` returns once no work that
      was issued before it can still touch the unmapped pages.
    * A handle is mapped at most once at a time (the pool guarantees it).
    * ``close`` releases everything the backend still holds, so a crash of the code above never leaks
      device memory beyond the backend object's lifetime.
    """

    #: Name used by ``backend=`` and ``python -m pyvattn info``.
    name: ClassVar[str]

    def __init__(self, device: torch.device, page_size: int):
        self.device = torch.device(device)
        self.page_size = int(page_size)

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

    # --- virtual ranges ----------------------------------------------------------------------
    @abc.abstractmethod
    def reserve(self, nbytes: int) -> int:
        """Reserve ``nbytes`` (a multiple of ``page_size``) of virtual addresses; return the base.

        The base is aligned to at least ``page_size`` (2 MiB where the device can use it).
        """

    @abc.abstractmethod
    def unreserve(self, base: int, nbytes: int) -> None:
        """Give back a reservation; every page in it must already be unmapped."""

    # --- physical pages ----------------------------------------------------------------------
    @abc.abstractmethod
    def create_pages(self, count: int) -> list[int]:
        """Create ``count`` physical pages of ``page_size`` bytes; return their handles."""

    @abc.abstractmethod
    def release_pages(self, handles: Sequence[int]) -> None:
        """Return unmapped pages to the OS / driver."""

    @abc.abstractmethod
    def map(self, vas: Sequence[int], handles: Sequence[int]) -> None:
        """Map ``handles[i]`` at ``vas[i]`` for every i, in as few driver calls as possible."""

    @abc.abstractmethod
    def unmap(self, vas: Sequence[int]) -> None:
        """Unmap the pages at ``vas``; the physical pages stay alive for reuse. If the driver
        fails part-way, the ``DriverError`` raised lists in ``unmapped_vas`` the pages that were
        unmapped before the failure (the others are still mapped)."""

    # --- access ------------------------------------------------------------------------------
    @abc.abstractmethod
    def tensor(self, base: int, nbytes: int) -> torch.Tensor:
        """A zero-copy 1-D ``uint8`` tensor over ``[base, base+nbytes)`` on ``self.device``."""

    def synchronize(self) -> None:
        """Wait until work already issued on the device is done (used before unmapping)."""

    def close(self) -> None:
        """Release every resource still held. Idempotent."""


def contiguous_runs(vas, handles=None, step: int = 1, handle_step: int | None = None):
    """Vectorised run-finding: sort by VA and split where VA (and, with ``handle_step``, the handle)
    stops advancing by ``step``. Returns three lists: first VA, first handle (``None`` without
    handles) and length of each run, in VA order."""
    v = np.asarray(vas, dtype=np.int64)
    if len(v) == 0:
        return [], [], []
    order = np.argsort(v, kind="stable")
    v = v[order]
    brk = np.diff(v) != step
    h = None
    if handles is not None:
        h = np.asarray(handles, dtype=np.int64)[order]
        if handle_step is not None:
            brk |= np.diff(h) != handle_step
    starts = np.flatnonzero(np.concatenate(([True], brk)))
    lengths = np.diff(np.append(starts, len(v)))
    return v[starts].tolist(), (h[starts].tolist() if h is not None else None), lengths.tolist()


def coalesce(vas: Sequence[int], handles: Sequence[int], step: int, handle_step: int | None = None):
    """Split parallel (va, handle) lists into runs that are contiguous in VA (by ``step``).

    With ``handle_step`` set, runs are also contiguous in handle value (e.g. memfd offsets), so a
    backend can map a whole run in one call. Yields ``(first_va, [handles...])`` in input order of
    sorted VA.
    """
    if not vas:
        return
    order = sorted(range(len(vas)), key=vas.__getitem__)
    run_va, run = vas[order[0]], [handles[order[0]]]
    for i in order[1:]:
        va, h = vas[i], handles[i]
        contiguous = va == run_va + len(run) * step
        if handle_step is not None:
            contiguous = contiguous and h == run[-1] + handle_step
        if contiguous:
            run.append(h)
        else:
            yield run_va, run
            run_va, run = va, [h]
    yield run_va, run

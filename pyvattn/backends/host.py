"""Host backend: the vAttention design on CPU memory.

* A physical page is a page-sized extent of one ``memfd``, allocated for real with ``fallocate``
  (running out of memory shows up at create time, as on a GPU, not as a later SIGBUS). Its handle
  is its offset in the memfd. Releasing punches the hole: the memory goes back to the OS.
* A reservation is address space only, and it reads as zeros: ``mmap(PROT_READ, MAP_PRIVATE |
  MAP_ANONYMOUS | MAP_NORESERVE)``. An unmapped page is that same filler again, so reading it (a
  ``print`` of a tensor, a debugger) gives zeros from the kernel's shared zero page, while writing
  it still faults (SIGSEGV: the caller's bug, caught at once).
* Every reservation owns a stretch of the memfd as large as itself, and :meth:`placement` gives a
  page the offset that *follows its place in the reservation*. Consecutive pages of a slab are
  then consecutive in the file, and Linux merges their mappings: a slab costs one mapping (VMA) for
  its pages plus one for the filler after them, however many pages it holds. The limit that matters
  is ``vm.max_map_count`` (65,530 by default) against about two mappings per slab.
* Mapping is ``mmap(MAP_FIXED | MAP_SHARED | MAP_POPULATE)`` of the extent, one call per run that
  is contiguous in VA and in the file. ``MAP_POPULATE`` fills the page tables there and then (on
  the mapping thread: ``step_async`` hides it), so the first write of a token takes no page fault.
* A reservation given back while a tensor still views it is sealed (``PROT_NONE``): a stale tensor
  faults instead of reading or writing the next cache's memory.
"""

from __future__ import annotations

import errno
import os

import numpy as np
import torch

from .._ffi import libc
from ..errors import OSCallError
from .base import Backend, MiB, Probe, Runs, Undo, runs, undo_one

_RESERVE_ALIGN = 2 * MiB  # lets 2 MiB pages (and huge pages) line up with the reservation
_FILLER = libc.MAP_PRIVATE | libc.MAP_ANONYMOUS | libc.MAP_NORESERVE
_OUT_OF_MEMORY = (errno.ENOMEM, errno.ENOSPC, errno.EFBIG)


class HostBackend(Backend):
    name = "host"
    handles_are_offsets = True

    def __init__(self, device: torch.device = torch.device("cpu"), page_size: int = 64 << 10):
        super().__init__(device, page_size)
        self.check_page_size(self.device, self.page_size)
        self._fd = libc.memfd_create("pyvattn-kv")
        self._file_end = 0  # offsets below are spoken for: reservations' stretches, loose pages
        self._stretch: dict[int, tuple[int, int]] = {}  # reservation base -> (first offset, bytes)
        self._loose_free: list[int] = []  # punched offsets of loose (unplaced) pages, for reuse

    # --- discovery ---------------------------------------------------------------------------
    @classmethod
    def probe(cls, device: torch.device) -> Probe:
        if torch.device(device).type != "cpu":
            return Probe(False, f"host memory serves CPU tensors only, not {device}")
        return Probe(True, "host memory via mmap + memfd")

    @classmethod
    def granularity(cls, device: torch.device) -> int:
        return libc.PAGE_SIZE

    @classmethod
    def default_page_size(cls, device: torch.device) -> int:
        return 64 << 10

    @classmethod
    def check_page_size(cls, device: torch.device, page_size: int) -> None:
        if torch.device(device).type != "cpu":
            raise ValueError(f"device={device} is not a CPU device; the host backend serves CPU only")
        super().check_page_size(device, page_size)

    def describe(self) -> dict:
        return {**super().describe(), "os_page_size": libc.PAGE_SIZE}

    def mapping_room(self) -> int | None:
        return libc.max_map_count() - libc.map_count()

    def placement(self, vas) -> np.ndarray:
        """The memfd offset that follows each VA's place in its reservation."""
        vas = np.asarray(vas, dtype=np.int64)
        base, _, pages = self._locate(vas)
        return self._stretch[base][0] + pages * self.page_size

    def allocated_bytes(self) -> int:
        """Bytes of memory the OS has really allocated behind this backend's pages."""
        return os.fstat(self._fd).st_blocks * 512 if self._fd >= 0 else 0

    # --- driver calls ------------------------------------------------------------------------
    def _reserve(self, nbytes: int) -> int:
        span = nbytes + _RESERVE_ALIGN
        raw = libc.mmap(0, span, libc.PROT_READ, _FILLER)
        base = -(-raw // _RESERVE_ALIGN) * _RESERVE_ALIGN
        try:  # trim the alignment slack (munmap of what is already gone is no error)
            if base > raw:
                libc.munmap(raw, base - raw)
            if raw + span > base + nbytes:
                libc.munmap(base + nbytes, raw + span - base - nbytes)
        except BaseException as exc:
            raise undo_one(exc, libc.munmap, raw, span)
        self._stretch[base] = (self._file_end, nbytes)
        self._file_end += nbytes
        return base

    def _unreserve(self, base: int, nbytes: int) -> None:
        libc.munmap(base, nbytes)
        self._stretch.pop(base, None)

    def _seal(self, base: int, nbytes: int) -> None:
        libc.mmap(base, nbytes, libc.PROT_NONE, _FILLER | libc.MAP_FIXED)

    def _create(self, count: int, at: np.ndarray | None, undo: Undo) -> list[int]:
        P = self.page_size
        if at is None:
            offsets = [self._loose_free.pop() for _ in range(min(count, len(self._loose_free)))]
            fresh = count - len(offsets)
            offsets += range(self._file_end, self._file_end + fresh * P, P)
            self._file_end += fresh * P  # spoken for even if the allocation below fails
        else:
            self._check_inside_stretches(at)
            offsets = at.tolist()
        for first, n in runs(offsets, P).spans():
            libc.fallocate(self._fd, 0, first, n * P)
            undo.push(self._punch, list(range(first, first + n * P, P)))
        return offsets

    def _release(self, handles: list[int], done: list[int]) -> None:
        P = self.page_size
        for first, n in runs(handles, P).spans():
            extent = list(range(first, first + n * P, P))
            self._punch(extent)
            done.extend(extent)
            self._loose_free.extend(h for h in extent if not self._in_a_stretch(h))

    def _punch(self, offsets: list[int]) -> None:
        mode = libc.FALLOC_FL_PUNCH_HOLE | libc.FALLOC_FL_KEEP_SIZE
        for first, n in runs(offsets, self.page_size).spans():
            libc.fallocate(self._fd, mode, first, n * self.page_size)

    def _map(self, batch: Runs, undo: Undo) -> None:
        P, fd, raw = self.page_size, self._fd, libc.raw_mmap
        prot = libc.PROT_READ | libc.PROT_WRITE
        flags = libc.MAP_SHARED | libc.MAP_FIXED | libc.MAP_POPULATE
        firsts, lengths = batch.vas[batch.starts].tolist(), batch.lengths.tolist()
        done = 0  # runs mapped; one undo step for all of them, pushed only if one is needed
        try:
            for va, offset, n in zip(firsts, batch.handles[batch.starts].tolist(), lengths):
                if raw(va, n * P, prot, flags, fd, offset) == libc.MAP_FAILED:
                    libc.check("mmap", -1)
                done += 1
        except BaseException:
            end = batch.starts[done] if done < len(firsts) else len(batch.vas)
            undo.push(self._unmap_pages, batch.vas[:end].tolist())
            raise

    def _unmap(self, batch: Runs, done: list[tuple[int, int]]) -> None:
        for va, n in batch.spans():
            self._fill(va, n)
            done.append((va, n))

    def _unmap_pages(self, vas: list[int]) -> None:
        for va, n in runs(vas, self.page_size).spans():
            self._fill(va, n)

    def _fill(self, va: int, pages: int) -> None:
        """Put the read-as-zero filler back over ``pages`` pages at ``va``."""
        libc.mmap(va, pages * self.page_size, libc.PROT_READ, _FILLER | libc.MAP_FIXED)

    def _shutdown(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def _out_of_memory(self, exc) -> bool:
        # mmap's ENOMEM also means "no mapping slot left" (vm.max_map_count): out of pages to map
        return isinstance(exc, OSCallError) and exc.code in _OUT_OF_MEMORY

    # --- helpers -----------------------------------------------------------------------------
    def _in_a_stretch(self, offset: int) -> bool:
        return any(first <= offset < first + size for first, size in self._stretch.values())

    def _check_inside_stretches(self, offsets: np.ndarray) -> None:
        inside = np.zeros(len(offsets), dtype=bool)
        for base, (first, size) in self._stretch.items():
            if base in self._tables:  # not a sealed one
                inside |= (offsets >= first) & (offsets < first + size)
        if not inside.all() or ((offsets % self.page_size) != 0).any():
            raise ValueError("at: some offsets are not pages of a live reservation's stretch of the memfd")

    # --- access ------------------------------------------------------------------------------
    def tensor(self, base: int, nbytes: int) -> torch.Tensor:
        return torch.frombuffer(libc.buffer(base, nbytes), dtype=torch.uint8)

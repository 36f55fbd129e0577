"""Host backend: the vAttention design on CPU memory.

* A reservation is ``mmap(PROT_NONE, MAP_NORESERVE)``: address space only.
* Physical pages are page-sized extents of one ``memfd``, allocated for real with ``fallocate``
  (so running out of memory shows up at create time, as on a GPU, not as a later SIGBUS).
* Mapping is ``mmap(MAP_FIXED | MAP_SHARED)`` of the extent; a run of pages that is contiguous both
  in VA and in the file takes one call.
* Unmapping puts ``PROT_NONE`` back over the range, so the VA stays reserved.
* Releasing punches a hole in the memfd: the memory really goes back to the OS.
"""

from __future__ import annotations

import errno
import os
from typing import Sequence

import torch

from .._ffi import libc
from ..errors import OSCallError, OutOfPages
from .base import Backend, MiB, Probe, coalesce, contiguous_runs

_RESERVE_ALIGN = 2 * MiB  # lets 2 MiB pages (and huge pages) line up with the reservation


class HostBackend(Backend):
    name = "host"

    def __init__(self, device: torch.device = torch.device("cpu"), page_size: int = 64 << 10):
        super().__init__(device, page_size)
        self.check_page_size(self.device, self.page_size)
        self._fd = libc.memfd_create("pyvattn-kv")
        self._file_size = 0
        self._free_offsets: list[int] = []  # punched extents of the memfd, reused before growing it
        self._live: set[int] = set()  # offsets of pages created and not released
        self._reservations: dict[int, int] = {}  # base -> nbytes

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

    # --- virtual ranges ----------------------------------------------------------------------
    def reserve(self, nbytes: int) -> int:
        if nbytes <= 0 or nbytes % self.page_size:
            raise ValueError(f"nbytes={nbytes} is not a positive multiple of page_size={self.page_size}")
        flags = libc.MAP_PRIVATE | libc.MAP_ANONYMOUS | libc.MAP_NORESERVE
        raw = libc.mmap(0, nbytes + _RESERVE_ALIGN, libc.PROT_NONE, flags)
        base = -(-raw // _RESERVE_ALIGN) * _RESERVE_ALIGN
        if base > raw:
            libc.munmap(raw, base - raw)
        tail = raw + nbytes + _RESERVE_ALIGN - (base + nbytes)
        if tail:
            libc.munmap(base + nbytes, tail)
        self._reservations[base] = nbytes
        return base

    def unreserve(self, base: int, nbytes: int) -> None:
        if self._reservations.get(base) != nbytes:
            raise ValueError(f"base={base:#x} nbytes={nbytes} is not a live reservation")
        libc.munmap(base, nbytes)
        del self._reservations[base]

    # --- physical pages ----------------------------------------------------------------------
    def create_pages(self, count: int) -> list[int]:
        if count < 0:
            raise ValueError(f"count={count} must be >= 0")
        reused = min(count, len(self._free_offsets))
        offsets = [self._free_offsets.pop() for _ in range(reused)]
        fresh = count - reused
        first_new = self._file_size
        try:
            if fresh:
                libc.ftruncate(self._fd, first_new + fresh * self.page_size)
                self._file_size = first_new + fresh * self.page_size
                offsets += range(first_new, self._file_size, self.page_size)
            for start, run in coalesce(offsets, offsets, self.page_size):
                libc.fallocate(self._fd, 0, start, len(run) * self.page_size)
        except OSCallError as exc:
            self._punch(offsets)
            self._free_offsets.extend(offsets)
            if exc.code in (errno.ENOSPC, errno.ENOMEM, errno.EFBIG):
                raise OutOfPages(f"host memory exhausted creating {count} pages: {exc}", needed=count) from exc
            raise
        self._live.update(offsets)
        return offsets

    def release_pages(self, handles: Sequence[int]) -> None:
        unknown = [h for h in handles if h not in self._live]
        if unknown:
            raise ValueError(f"handles {unknown[:4]} are not live pages of this backend")
        self._punch(handles)
        self._live.difference_update(handles)
        self._free_offsets.extend(handles)

    def _punch(self, offsets: Sequence[int]) -> None:
        mode = libc.FALLOC_FL_PUNCH_HOLE | libc.FALLOC_FL_KEEP_SIZE
        for start, run in coalesce(offsets, offsets, self.page_size):
            libc.fallocate(self._fd, mode, start, len(run) * self.page_size)

    def _check_span(self, first_va: int, end_va: int, vas: list[int]) -> None:
        # MAP_FIXED outside our reservations would silently replace unrelated memory.
        # Alignment is relative to the reservation: a page size need not divide its 2 MiB alignment.
        base = next((b for b, n in self._reservations.items() if b <= first_va and end_va <= b + n), None)
        if base is None or any((va - base) % self.page_size for va in vas):
            raise ValueError(f"vas: [{first_va:#x}, {end_va:#x}) is not page-aligned inside one reservation")

    def map(self, vas: Sequence[int], handles: Sequence[int]) -> None:
        if len(vas) != len(handles):
            raise ValueError(f"len(vas)={len(vas)} != len(handles)={len(handles)}")
        P = self.page_size
        starts, offsets, lengths = contiguous_runs(vas, handles, P, P)
        if not starts:
            return
        self._check_span(starts[0], starts[-1] + lengths[-1] * P, starts)
        if not self._live.issuperset(handles):  # every handle, not only each run's first
            raise ValueError("handles: some are not live pages of this backend")
        raw, fd = libc.raw_mmap, self._fd
        prot, flags = libc.PROT_READ | libc.PROT_WRITE, libc.MAP_SHARED | libc.MAP_FIXED
        for i, (va, off, n) in enumerate(zip(starts, offsets, lengths)):
            if raw(va, n * P, prot, flags, fd, off) == libc.MAP_FAILED:
                err = libc.ffi.errno
                for va_done, n_done in zip(starts[:i], lengths[:i]):  # all or nothing
                    self._protect_none(va_done, n_done * P)
                libc.ffi.errno = err
                libc.check("mmap", -1)

    def unmap(self, vas: Sequence[int]) -> None:
        P = self.page_size
        starts, _, lengths = contiguous_runs(vas, None, P)
        if not starts:
            return
        self._check_span(starts[0], starts[-1] + lengths[-1] * P, starts)
        for i, (va, n) in enumerate(zip(starts, lengths)):
            try:
                self._protect_none(va, n * P)
            except OSCallError as exc:
                exc.unmapped_vas = [s + k * P for s, m in zip(starts[:i], lengths[:i]) for k in range(m)]
                raise

    @staticmethod
    def _protect_none(va: int, nbytes: int) -> None:
        flags = libc.MAP_PRIVATE | libc.MAP_ANONYMOUS | libc.MAP_NORESERVE | libc.MAP_FIXED
        libc.mmap(va, nbytes, libc.PROT_NONE, flags)

    # --- access ------------------------------------------------------------------------------
    def tensor(self, base: int, nbytes: int) -> torch.Tensor:
        return torch.frombuffer(libc.buffer(base, nbytes), dtype=torch.uint8)

    def allocated_bytes(self) -> int:
        """Bytes of memory the OS has really allocated behind this backend's pages."""
        return os.fstat(self._fd).st_blocks * 512 if self._fd >= 0 else 0

    def close(self) -> None:
        for base, nbytes in list(self._reservations.items()):
            self.unreserve(base, nbytes)
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        self._live.clear()
        self._free_offsets.clear()

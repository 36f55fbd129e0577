"""VirtualBuffer: one reserved virtual range, its page table, and zero-copy tensor views."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from .backends.base import Backend
from .errors import DriverError

UNMAPPED = -1


class VirtualBuffer:
    """A range of ``num_pages`` virtual pages of one backend, each either unmapped or backed by a
    physical page handle.

    ``map``/``unmap`` take arrays of page indices and issue one batched backend call; they check the
    whole batch first, so a bad index leaves the buffer unchanged. ``view`` gives torch tensors of
    any dtype and shape over the range, zero-copy; touching an unmapped page through them is the
    caller's bug (SIGSEGV on the host, an illegal-address fault on a GPU).
    """

    def __init__(self, backend: Backend, nbytes: int):
        self.backend = backend
        self.page_size = backend.page_size
        self.num_pages = -(-nbytes // self.page_size)
        self.nbytes = self.num_pages * self.page_size
        self.base = backend.reserve(self.nbytes)
        self._handles = np.full(self.num_pages, UNMAPPED, dtype=np.int64)
        self._bytes = backend.tensor(self.base, self.nbytes)
        self.mapped_pages = 0

    def handles(self, pages: np.ndarray) -> np.ndarray:
        """Handles mapped at ``pages`` (``UNMAPPED`` where none)."""
        return self._handles[pages]

    def map(self, pages: np.ndarray, handles: Sequence[int]) -> None:
        """Map ``handles[i]`` at page ``pages[i]``; every page must be unmapped."""
        pages = np.asarray(pages, dtype=np.int64)
        if len(pages) != len(handles):
            raise ValueError(f"len(pages)={len(pages)} != len(handles)={len(handles)}")
        if len(pages) == 0:
            return
        self._check_pages(pages)
        if (self._handles[pages] != UNMAPPED).any():
            raise ValueError("pages: some are already mapped")
        if len(np.unique(pages)) != len(pages):
            raise ValueError("pages: duplicates in one batch")
        self.backend.map((self.base + pages * self.page_size).tolist(), list(handles))
        self._handles[pages] = handles
        self.mapped_pages += len(pages)

    def unmap(self, pages: np.ndarray) -> list[int]:
        """Unmap ``pages`` (all must be mapped); return the handles that backed them."""
        pages = np.asarray(pages, dtype=np.int64)
        if len(pages) == 0:
            return []
        self._check_pages(pages)
        handles = self._handles[pages]
        if (handles == UNMAPPED).any():
            raise ValueError("pages: some are not mapped")
        try:
            self.backend.unmap((self.base + pages * self.page_size).tolist())
        except DriverError as exc:  # the pages unmapped before the failure are unmapped for good
            gone = (np.asarray(exc.unmapped_vas, dtype=np.int64) - self.base) // self.page_size
            self._handles[gone] = UNMAPPED
            self.mapped_pages -= len(gone)
            raise
        self._handles[pages] = UNMAPPED
        self.mapped_pages -= len(pages)
        return handles.tolist()

    def unmap_all(self) -> list[int]:
        return self.unmap(np.flatnonzero(self._handles != UNMAPPED))

    def view(self, offset: int, shape: Sequence[int], dtype: torch.dtype,
             strides: Sequence[int] | None = None) -> torch.Tensor:
        """A tensor of ``dtype`` and ``shape`` starting ``offset`` bytes into the range.

        ``strides`` are in elements (default: contiguous). The view must fit inside the range.
        """
        itemsize = torch.empty((), dtype=dtype).element_size()
        if offset % itemsize:
            raise ValueError(f"offset={offset} is not a multiple of {dtype}'s size {itemsize}")
        if strides is None:
            strides = torch.empty(tuple(shape), device="meta").stride()
        extent = 1 + sum((n - 1) * s for n, s in zip(shape, strides) if n > 0)
        if offset < 0 or offset + extent * itemsize > self.nbytes:
            raise ValueError(f"view of {tuple(shape)} {dtype} at offset {offset} exceeds the buffer")
        flat = self._bytes[offset:offset + extent * itemsize].view(dtype)
        return flat.as_strided(tuple(shape), tuple(strides))

    def close(self) -> list[int]:
        """Unmap everything and give back the reservation; return the handles that were mapped."""
        handles = self.unmap_all()
        self._bytes = None
        self.backend.unreserve(self.base, self.nbytes)
        return handles

    def _check_pages(self, pages: np.ndarray) -> None:
        if pages.min() < 0 or pages.max() >= self.num_pages:
            raise ValueError(f"pages: indices must lie in [0, {self.num_pages})")

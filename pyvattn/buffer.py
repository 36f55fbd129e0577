"""VirtualBuffer: one reserved virtual range and zero-copy tensor views of it."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from .backends.base import Backend, undo_one


class VirtualBuffer:
    """A range of ``num_pages`` virtual pages of one backend, addressed by page index.

    The backend keeps the books (the handle at each page); ``map``/``unmap`` translate page
    indices to addresses and make one batched backend call, which checks the whole batch first.
    ``view`` gives torch tensors of any dtype and shape over the range, zero-copy. On the host an
    unmapped page reads as zeros and faults when written; on a GPU touching one is an
    illegal-address fault. Views kept after ``close`` keep the range reserved (and inaccessible)
    until they die, so they can never reach memory that a later reservation got.
    """

    def __init__(self, backend: Backend, nbytes: int):
        self.backend = backend
        self.page_size = backend.page_size
        self.num_pages = -(-nbytes // self.page_size)
        self.nbytes = self.num_pages * self.page_size
        self.base = backend.reserve(self.nbytes)
        try:
            self._bytes: torch.Tensor | None = backend.view(self.base, self.nbytes)
        except BaseException as exc:
            raise undo_one(exc, backend.unreserve, self.base, self.nbytes)

    @property
    def mapped_pages(self) -> int:
        return self.backend.mapped_pages_in(self.base)

    def vas(self, pages) -> np.ndarray:
        return self.base + np.asarray(pages, dtype=np.int64) * self.page_size

    def handles(self, pages) -> np.ndarray:
        """Handles mapped at ``pages`` (``UNMAPPED`` where none)."""
        return self.backend.handles_at(self.vas(pages))

    def map(self, pages, handles: Sequence[int]) -> None:
        """Map ``handles[i]`` at page ``pages[i]``; every page must be unmapped."""
        self.backend.map(self.vas(pages), handles)

    def unmap(self, pages) -> list[int]:
        """Unmap ``pages`` (all must be mapped); return the handles that backed them."""
        vas = self.vas(pages)
        handles = self.backend.handles_at(vas)
        self.backend.unmap(vas)
        return handles.tolist()

    def view(self, offset: int, shape: Sequence[int], dtype: torch.dtype,
             strides: Sequence[int] | None = None) -> torch.Tensor:
        """A tensor of ``dtype`` and ``shape`` starting ``offset`` bytes into the range.

        ``strides`` are in elements (default: contiguous). The view must fit inside the range.
        """
        if self._bytes is None:
            raise RuntimeError("this VirtualBuffer is closed")
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

    def close_views(self) -> None:
        """Drop the buffer's own tensor: from now on only views handed out keep the range alive."""
        self._bytes = None

    def close(self) -> list[int]:
        """Unmap everything and give back the reservation; return the handles that were mapped.
        Views still alive keep the range reserved, inaccessible, until they die."""
        vas = self.backend.mapped_vas(self.base)
        handles = self.backend.handles_at(vas).tolist() if len(vas) else []
        if handles:
            self.backend.unmap(vas)
        self.close_views()
        self.backend.unreserve(self.base, self.nbytes)
        return handles

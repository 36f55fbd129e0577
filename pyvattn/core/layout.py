"""Layout: a KVCache's arguments, checked, and the sizes that follow from them."""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np
import torch

from ..units import parse_size


@dataclass(frozen=True)
class Layout:
    """The shape of a cache on one backend. ``of`` checks every argument (``ValueError`` naming
    it); the rest is derived: bytes per token (one layer's K or V), pages per slab, slab bytes
    (a slab starts on a page boundary), regions (K and V of every layer), the budget in pages."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    max_batch_size: int
    max_seq_len: int
    dtype: torch.dtype
    page_size: int
    token_bytes: int
    pages_per_slot: int
    slot_bytes: int
    num_regions: int
    budget_pages: int | None

    @classmethod
    def of(cls, backend_cls, device: torch.device, num_layers, num_kv_heads, head_dim,
           max_batch_size, max_seq_len, dtype, page_size, memory_budget) -> "Layout":
        ints = {name: _positive_int(value, name) for name, value in (
            ("num_layers", num_layers), ("num_kv_heads", num_kv_heads), ("head_dim", head_dim),
            ("max_batch_size", max_batch_size), ("max_seq_len", max_seq_len))}
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise ValueError(f"dtype={dtype!r} must be a floating-point torch.dtype")
        token_bytes = ints["num_kv_heads"] * ints["head_dim"] * torch.empty((), dtype=dtype).element_size()
        page = _page_size(backend_cls, device, page_size, ints["max_seq_len"] * token_bytes)
        pages_per_slot = -(-ints["max_seq_len"] * token_bytes // page)
        budget_pages = None
        if memory_budget is not None:
            budget = parse_size(memory_budget, "memory_budget")
            if budget < 0:
                raise ValueError(f"memory_budget={memory_budget!r} must be >= 0")
            budget_pages = budget // page
        return cls(**ints, dtype=dtype, page_size=page, token_bytes=token_bytes,
                   pages_per_slot=pages_per_slot, slot_bytes=pages_per_slot * page,
                   num_regions=2 * ints["num_layers"], budget_pages=budget_pages)

    def as_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @property
    def reservation_bytes(self) -> int:
        return self.num_regions * self.max_batch_size * self.slot_bytes

    def region_view(self, buffer, region: int) -> torch.Tensor:
        """Region ``region``'s tensor ``[max_batch_size, max_seq_len, num_kv_heads, head_dim]``."""
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        shape = (self.max_batch_size, self.max_seq_len, self.num_kv_heads, self.head_dim)
        strides = (self.slot_bytes // itemsize, self.num_kv_heads * self.head_dim, self.head_dim, 1)
        return buffer.view(region * self.max_batch_size * self.slot_bytes, shape, self.dtype, strides)

    def check_mapping_room(self, backend, backend_name: str) -> None:
        """Refuse a cache whose slabs could need more memory mappings than the process has left
        (the host backend: up to two per slab, its pages and the filler after them)."""
        room = backend.mapping_room()
        worst = 2 * self.num_regions * self.max_batch_size + 2
        if room is not None and worst > room:
            raise ValueError(
                f"max_batch_size={self.max_batch_size} x num_layers={self.num_layers} (K and V) can need "
                f"{worst} memory mappings on the {backend_name} backend (two per slot per region), "
                f"and this process has {room} left under vm.max_map_count: lower max_batch_size or "
                f"num_layers, or raise the limit (sysctl vm.max_map_count)")

    def reservation_error(self, exc: BaseException) -> ValueError:
        """A refused reservation, said with the arguments that sized it."""
        return ValueError(
            f"reserving {self.reservation_bytes} bytes of address space (max_batch_size="
            f"{self.max_batch_size} x max_seq_len={self.max_seq_len} x num_layers={self.num_layers} x 2 x "
            f"{self.token_bytes} bytes per token) failed: {exc}")


def _positive_int(value, name: str) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise ValueError(f"{name}={value!r} must be a positive integer")
    return int(value)


def _page_size(backend_cls, device: torch.device, page_size, slab_data_bytes: int) -> int:
    """The page size asked for, checked: a backend granule multiple, no bigger than a slab needs."""
    if page_size == "auto":
        return backend_cls.default_page_size(device)
    size = parse_size(page_size, "page_size")
    backend_cls.check_page_size(device, size)
    gran = backend_cls.granularity(device)
    most = max(gran, -(-slab_data_bytes // gran) * gran)
    if size > most:
        raise ValueError(f"page_size={page_size!r} is larger than one slot's K or V of one layer needs "
                         f"({most} bytes: max_seq_len x bytes per token, in {gran}-byte granules)")
    return size

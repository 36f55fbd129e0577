"""Distinct, exactly representable values per (slot tag, layer, K/V, token, head, dim)."""

from __future__ import annotations

import torch

from pyvattn import KVCache


def pattern(tag: int, layer: int, kind: int, start: int, stop: int, heads: int, dim: int) -> torch.Tensor:
    t = torch.arange(start, stop, dtype=torch.int64)[:, None, None]
    h = torch.arange(heads)[None, :, None]
    d = torch.arange(dim)[None, None, :]
    return ((tag * 7919 + layer * 613 + kind * 307 + t * 37 + h * 11 + d) % 65521).to(torch.float32)


def write(cache: KVCache, slot: int, tag: int, start: int, stop: int) -> None:
    """Write tokens [start, stop) of ``slot`` in every layer's K and V."""
    for layer in range(cache.num_layers):
        for kind, t in enumerate((cache.k[layer], cache.v[layer])):
            t[slot, start:stop] = pattern(tag, layer, kind, start, stop, cache.num_kv_heads,
                                          cache.head_dim).to(t.dtype).to(t.device)


def check(cache: KVCache, slot: int, tag: int, stop: int, start: int = 0) -> None:
    """Assert tokens [start, stop) of ``slot`` hold what ``write`` put there."""
    for layer in range(cache.num_layers):
        for kind, t in enumerate((cache.k[layer], cache.v[layer])):
            got = t[slot, start:stop].float().cpu()
            want = pattern(tag, layer, kind, start, stop, cache.num_kv_heads, cache.head_dim)
            assert torch.equal(got, want), f"slot {slot} tag {tag} layer {layer} {'KV'[kind]} differs"

"""Host backend under real load: mappings that grow with slots x regions, not with pages; running
out of mappings or memory is OutOfPages with everything rolled back (issue 11, item 1)."""

from __future__ import annotations

import errno

import pytest
import torch

from books import check_cache, check_host_backend
from pyvattn import KVCache, OutOfPages
from pyvattn._ffi import libc


def _token_values(step: int, slots: list[int], layer: int) -> torch.Tensor:
    """A distinct value per (token, slot, layer), exact in fp16."""
    return torch.tensor([(step * 7 + s * 3 + layer) % 1024 for s in slots], dtype=torch.float16)


def test_decode_one_token_at_a_time_keeps_mappings_bounded_by_slots_x_regions():
    """8 layers x batch 32 x 4 KiB pages (32 tokens of 128 B), every request decoded one token at
    a time to 1024 tokens: 16,384 page maps. Each page its own mapping would be 16,384 VMAs; a
    slab's pages merge into one, so the count stays under 2 per slab and the data is intact. (The
    review's r1: 32 layers x batch 64 died at length 449 with ENOMEM.) scripts/host_decode_load.py
    runs the issue's full size (32 layers, batch 128, 4096 tokens: a million page maps)."""
    layers, batch, length = 8, 32, 1024
    with KVCache(layers, 1, 64, batch, length, torch.float16, device="cpu", page_size=4096) as cache:
        assert cache.page_size // cache.token_bytes == 32
        slots = [cache.alloc_slot() for _ in range(batch)]
        before = libc.map_count()
        most = 0
        for n in range(1, length + 1):
            cache.step({s: n for s in slots})
            for layer in range(layers):
                cache.k[layer][slots, n - 1, 0, 0] = _token_values(n, slots, layer)
                cache.v[layer][slots, n - 1, 0, 0] = -_token_values(n, slots, layer)
            if n % 32 == 1:  # a step that mapped a page in every slab
                most = max(most, libc.map_count() - before)
        slabs = 2 * layers * batch
        assert cache.stats()["mapped_pages_total"] == slabs * length // 32 == 16384
        assert most <= 2 * slabs + 4, f"{most} mappings for {slabs} slabs"
        for layer in range(layers):
            want = torch.stack([_token_values(n, slots, layer) for n in range(1, length + 1)], dim=1)
            assert torch.equal(cache.k[layer][slots, :, 0, 0], want)
            assert torch.equal(cache.v[layer][slots, :, 0, 0], -want)
        check_cache(cache)


def test_mapping_count_is_checked_against_vm_max_map_count_up_front(monkeypatch):
    from pyvattn.backends.host import HostBackend

    monkeypatch.setattr(HostBackend, "mapping_room", lambda self: 1000)
    with pytest.raises(ValueError, match="max_batch_size=64 x num_layers=8.*vm.max_map_count"):
        KVCache(8, 1, 64, 64, 1024, torch.float16, device="cpu", page_size=4096)
    KVCache(8, 1, 64, 16, 1024, torch.float16, device="cpu", page_size=4096).close()  # 514 fit


def _failing_mmap(monkeypatch, from_call: int, persistent: bool):
    """``raw_mmap`` (the mapping call) and ``mmap`` (the filler that unmaps) fail with ENOMEM from
    the ``from_call``-th call on (only that one unless ``persistent``): as at vm.max_map_count."""
    calls = [0]
    real_raw, real_mmap = libc.raw_mmap, libc.mmap

    def failing(real, raw):
        def call(*args):
            calls[0] += 1
            if calls[0] == from_call or (persistent and calls[0] > from_call):
                libc.ffi.errno = errno.ENOMEM
                if raw:
                    return libc.MAP_FAILED
                libc.check("mmap", -1)
            return real(*args)
        return call

    monkeypatch.setattr(libc, "raw_mmap", failing(real_raw, True))
    monkeypatch.setattr(libc, "mmap", failing(real_mmap, False))
    return lambda: (monkeypatch.setattr(libc, "raw_mmap", real_raw), monkeypatch.setattr(libc, "mmap", real_mmap))


@pytest.mark.parametrize("persistent", [False, True], ids=["once", "undo-fails-too"])
def test_enomem_while_mapping_is_out_of_pages_with_everything_rolled_back(monkeypatch, persistent):
    from kvdata import check, write

    cache = KVCache(2, 1, 64, 4, 512, torch.float32, device="cpu", page_size=4096)
    try:
        a, b = cache.alloc_slot(), cache.alloc_slot()
        cache.step({a: 40, b: 20})
        write(cache, a, 1, 0, 40)
        write(cache, b, 2, 0, 20)
        before = cache.stats()
        restore = _failing_mmap(monkeypatch, from_call=3, persistent=persistent)
        with pytest.raises(OutOfPages) as info:
            cache.step({a: 200, b: 300})  # a run per slot and region: the 3rd mmap fails
        restore()
        assert "ENOMEM" in str(info.value)
        if persistent:  # the rollback's own mmaps failed: the books keep what stayed mapped
            assert info.value.cleanup_error is not None
        check_cache(cache)
        after = cache.stats()
        assert after["used_bytes"] == before["used_bytes"] and cache.seq_len(a) == 40
        check(cache, a, 1, 40)
        check(cache, b, 2, 20)
        cache.step({a: 200, b: 300})  # the failure is gone: the same step works, strays adopted
        write(cache, a, 1, 40, 200)
        write(cache, b, 2, 20, 300)
        check(cache, a, 1, 200)
        check(cache, b, 2, 300)
        check_cache(cache)
        cache.free_slot(a)
        cache.trim()
        check_cache(cache)
    finally:
        cache.close()


def test_enomem_while_unmapping_keeps_the_books_and_a_later_trim_finishes(monkeypatch):
    cache = KVCache(2, 1, 64, 4, 512, torch.float32, device="cpu", page_size=4096)
    try:
        a = cache.alloc_slot()
        cache.step({a: 300})
        cache.free_slot(a)
        restore = _failing_mmap(monkeypatch, from_call=2, persistent=False)
        with pytest.raises(Exception) as info:
            cache.trim()  # a run per region: the second fails
        restore()
        assert "ENOMEM" in str(info.value)
        check_cache(cache)
        assert cache.stats()["mapped_bytes"] == 3 * 19 * 4096  # 4 regions x 19 pages: one run went
        assert cache.trim() > 0
        check_cache(cache)
        assert cache.stats()["mapped_bytes"] == 0 and cache.backend.allocated_bytes() == 0
    finally:
        cache.close()


def test_host_backend_alone_books_equal_the_os_through_map_unmap_release():
    from pyvattn.backends.host import HostBackend

    P = 4096
    b = HostBackend(page_size=P)
    try:
        base = b.reserve(64 * P)
        placed = b.create_pages(8, at=b.placement([base + i * P for i in range(8)]))
        loose = b.create_pages(4)
        b.map([base + i * P for i in range(8)], placed)  # one run, one mapping
        b.map([base + (20 + i) * P for i in range(4)], loose)
        check_host_backend(b)
        b.unmap([base + 3 * P, base + 21 * P])
        check_host_backend(b)
        b.release_pages([placed[3], loose[1]])
        check_host_backend(b)
        with pytest.raises(ValueError, match="not live, unmapped"):
            b.release_pages([placed[0]])  # still mapped
    finally:
        b.close()

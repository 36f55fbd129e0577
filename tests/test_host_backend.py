"""The host backend against the OS: real mappings, real memory returned."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from kvdata import check, write
from pyvattn import KVCache, OutOfPages, VirtualBuffer
from pyvattn.backends.host import HostBackend

P = 64 << 10


def _maps_contain(addr: int) -> bool:
    with open("/proc/self/maps") as f:
        for line in f:
            lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
            if lo <= addr < hi:
                return True
    return False


def test_pages_alias_the_same_memory_wherever_mapped():
    b = HostBackend(page_size=P)
    try:
        base = b.reserve(16 * P)
        h = b.create_pages(2)
        b.map([base + 3 * P, base + 9 * P], h)
        b.tensor(base + 3 * P, P)[:] = 42
        b.unmap([base + 3 * P])
        b.unmap([base + 9 * P])
        b.map([base], [h[0]])  # same physical page at another address keeps its data
        assert bool((b.tensor(base, P) == 42).all())
        b.unmap([base])
    finally:
        b.close()


def test_contiguous_runs_map_in_one_call_and_data_is_per_page():
    b = HostBackend(page_size=P)
    try:
        base = b.reserve(8 * P)
        h = b.create_pages(8)
        vas = [base + i * P for i in range(8)]
        b.map(vas[::-1], h[::-1])  # order does not matter
        t = b.tensor(base, 8 * P)
        t.view(8, P)[:] = torch.arange(8, dtype=torch.uint8)[:, None]
        for i in range(8):
            assert int(b.tensor(vas[i], P)[0]) == i
        b.unmap(vas)
    finally:
        b.close()


def test_map_outside_a_reservation_is_refused():
    b = HostBackend(page_size=P)
    try:
        base = b.reserve(4 * P)
        h = b.create_pages(1)
        with pytest.raises(ValueError, match="reservation"):
            b.map([base + 4 * P], h)
        with pytest.raises(ValueError, match="reservation"):
            b.map([base + 100], h)
        with pytest.raises(ValueError, match="not live"):
            b.map([base], [12345 * P])
        # a run of pages: its first handle is live, the second is not
        with pytest.raises(ValueError, match="not live"):
            b.map([base, base + P], [h[0], h[0] + P])
    finally:
        b.close()


def test_release_punches_holes_so_memory_returns_to_the_os():
    b = HostBackend(page_size=P)
    try:
        h = b.create_pages(64)
        assert b.allocated_bytes() >= 64 * P  # fallocate: really allocated at create
        b.release_pages(h[:32])
        assert b.allocated_bytes() == 32 * P
        again = b.create_pages(16)  # punched extents are reused before the file grows
        assert set(again) <= set(h[:32])
        assert b.allocated_bytes() == 48 * P
    finally:
        b.close()


def test_cache_close_returns_memory_and_address_space_to_the_os():
    cache = KVCache(4, 8, 128, 8, 4096, torch.float16, device="cpu", page_size="64KiB")
    slots = [cache.alloc_slot() for _ in range(4)]
    cache.step({s: 3000 for s in slots})
    for s in slots:
        write(cache, s, s, 0, 3000)
    witness = os.dup(cache.backend._fd)  # keeps the memfd alive so we can look at it after close
    try:
        mapped = cache.stats()["mapped_bytes"]
        assert os.fstat(witness).st_blocks * 512 >= mapped >= 4 * 3000 * 2048 * 8
        base = cache.buffer.base
        assert _maps_contain(base)
        cache.close()
        assert os.fstat(witness).st_blocks == 0  # every page's memory went back to the OS
        assert not _maps_contain(base)  # and the reservation is gone
    finally:
        os.close(witness)


def test_trim_releases_free_pages():
    with KVCache(2, 2, 64, 4, 2048, torch.float16, device="cpu") as cache:
        a, b = cache.alloc_slot(), cache.alloc_slot()
        cache.step({a: 2048, b: 100})
        cache.free_slot(a)
        before = cache.backend.allocated_bytes()
        released = cache.trim()
        assert released > 0
        assert cache.backend.allocated_bytes() == before - released * cache.page_size
        assert cache.stats()["mapped_bytes"] == cache.stats()["physical_bytes"]


# 192 KiB and 3 MiB do not divide the reservations' 2 MiB alignment (static's max-length pages don't)
@pytest.mark.parametrize("page_size", [4096, 64 << 10, 192 << 10, 2 << 20, 3 << 20])
def test_page_sizes(page_size):
    with KVCache(2, 4, 64, 2, 9000, torch.float32, device="cpu", page_size=page_size) as cache:
        slot = cache.alloc_slot()
        cache.step({slot: 5000})
        write(cache, slot, 1, 0, 5000)
        assert cache.stats()["mapped_bytes"] % page_size == 0
        other = cache.alloc_slot()
        cache.step({slot: 9000, other: 3000})
        write(cache, other, 2, 0, 3000)
        check(cache, slot, 1, 5000)
        check(cache, other, 2, 3000)


def test_virtual_buffer_rejects_bad_pages_without_changing_state():
    b = HostBackend(page_size=P)
    try:
        buf = VirtualBuffer(b, 8 * P)
        h = b.create_pages(2)
        buf.map(np.array([1]), h[:1])
        with pytest.raises(ValueError, match="already mapped"):
            buf.map(np.array([2, 1]), h)
        with pytest.raises(ValueError, match="reservation"):
            buf.map(np.array([8]), h[1:])
        assert buf.mapped_pages == 1 and buf.handles(np.array([2]))[0] == -1
        assert buf.close() == h[:1]
    finally:
        b.close()


def test_budget_is_a_hard_limit():
    with KVCache(1, 1, 64, 2, 100000, torch.float32, device="cpu", memory_budget="1MiB") as cache:
        slot = cache.alloc_slot()
        with pytest.raises(OutOfPages):
            cache.step({slot: 100000})
        cache.step({slot: 1024})  # 2 x 256 KiB fits
        assert cache.stats()["physical_bytes"] <= 1 << 20


def test_unmap_failure_part_way_keeps_the_buffer_page_table_exact(monkeypatch):
    """The second run's munmap-equivalent fails: the VirtualBuffer marks the first run unmapped
    (it is), keeps the second mapped, and the cache still closes cleanly afterwards."""
    from pyvattn._ffi import libc
    from pyvattn.errors import OSCallError

    cache = KVCache(1, 1, 64, 4, 1024, torch.float32, device="cpu", page_size=4096, backend="host")
    a = cache.alloc_slot()
    cache.step({a: 64})  # 4 pages in K, 4 in V: two runs
    buf = cache.buffer
    mapped = buf.mapped_pages
    real_mmap, calls = libc.mmap, []

    def failing_second(*args):
        calls.append(args)
        if len(calls) == 2:
            raise OSCallError("mmap", "ENOMEM", 12)
        return real_mmap(*args)

    monkeypatch.setattr(libc, "mmap", failing_second)
    pages = np.flatnonzero(buf.handles(np.arange(buf.num_pages)) >= 0)
    with pytest.raises(OSCallError) as info:
        buf.unmap(pages)
    monkeypatch.setattr(libc, "mmap", real_mmap)
    assert len(info.value.unmapped_vas) == 4 and buf.mapped_pages == mapped - 4
    cache.close()  # unmaps the rest and releases everything without complaint

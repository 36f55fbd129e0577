"""Checks that a cache's and a backend's books equal reality: the OS's mappings (host), the
handles that exist, the slot table, the stats identity, and the data written."""

from __future__ import annotations

import os

import numpy as np

from pyvattn.backends.base import UNMAPPED


def kv_memfds() -> int:
    """How many pyvattn memfds this process has open."""
    n = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            n += "pyvattn-kv" in os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            pass
    return n


def memfd_mappings(fd: int) -> dict[int, tuple[int, str]]:
    """{page-aligned VA: (memfd offset, permissions)} for every 4 KiB page of ``fd`` mapped in this
    process, from /proc/self/maps."""
    inode = os.fstat(fd).st_ino
    out = {}
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split()
            if len(parts) < 6 or "pyvattn-kv" not in parts[5] or int(parts[4]) != inode:
                continue
            lo, hi = (int(x, 16) for x in parts[0].split("-"))
            off = int(parts[2], 16)
            for va in range(lo, hi, 4096):
                out[va] = (off + va - lo, parts[1])
    return out


def vmas_in(lo: int, hi: int) -> list[tuple[int, int, str]]:
    """(start, end, permissions) of every mapping overlapping [lo, hi)."""
    out = []
    with open("/proc/self/maps") as f:
        for line in f:
            a, b = (int(x, 16) for x in line.split()[0].split("-"))
            if a < hi and b > lo:
                out.append((a, b, line.split()[1]))
    return out


def check_host_backend(backend) -> None:
    """The host backend's books equal the OS: every booked page is mapped from its memfd offset
    (read-write, shared), nothing else of the memfd is mapped, the rest of every reservation is the
    read-as-zero filler, and the memfd holds exactly the live pages' memory."""
    books = backend.books()
    real = memfd_mappings(backend._fd)
    P = backend.page_size
    expect = {}
    for va, h in books["mapped"].items():
        for k in range(0, P, 4096):
            expect[va + k] = (h + k, "rw-s")
    assert real == expect, f"{len(set(real) ^ set(expect))} pages differ between the books and /proc/self/maps"
    for base, table in backend._tables.items():
        for a, b, perms in vmas_in(base, base + len(table) * P):
            assert perms in ("rw-s", "r--p"), f"{a:#x}-{b:#x} {perms} inside a reservation"
    assert os.fstat(backend._fd).st_blocks * 512 == len(books["live"]) * P


def check_cache(cache) -> None:
    """The cache's books are consistent: slots hold what the backend's books say, every handle is
    free in the pool, mapped, or an orphan (and only one of those), the stats add up."""
    backend, slabs, pool = cache.backend, cache._slabs, cache.pool
    books = backend.books()
    if backend.name == "host":
        check_host_backend(backend)
    every = np.arange(cache.max_batch_size)
    top = slabs.vas(every, np.zeros_like(every), np.full_like(every, cache.pages_per_slot))
    h = backend.handles_at(top).reshape(cache.num_regions, cache.max_batch_size, cache.pages_per_slot)
    mapped = h != UNMAPPED
    for s in every.tolist():
        held, extent = int(slabs.held[s]), int(slabs.extent[s])
        assert mapped[:, s, :held].all(), f"slot {s}: pages below held={held} are not all mapped"
        assert not mapped[:, s, extent:].any(), f"slot {s}: pages at or beyond extent={extent} are mapped"
        assert held <= extent
        assert slabs.capacity[s] == min(cache.max_seq_len, held * cache.page_size // cache.token_bytes)
    free = pool.free_handles()
    in_use = set(books["mapped"].values())
    assert len(set(free)) == len(free) and not set(free) & in_use
    assert set(free) | in_use | books["orphans"] == books["live"], "a handle is unaccounted for"
    assert pool.total_pages == len(free) + len(in_use)
    assert (cache._slots.lengths[~cache._slots.active] == 0).all()
    st = cache.stats()
    assert st["mapped_bytes"] == len(books["mapped"]) * cache.page_size
    assert st["mapped_bytes"] == st["used_bytes"] + st["fragmentation_bytes"] + st["retained_bytes"]
    assert st["waste_bytes"] == st["fragmentation_bytes"] + st["retained_bytes"]

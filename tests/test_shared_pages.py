"""Reference-counted mappings in the backend's books (issue 14, item 1): one physical page mapped at
several VAs, the books equal to /proc/self/maps and the memfd after every call, faults included."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from books import check_host_backend
from faults import EXPECTED, HOST_DRIVER_CALLS, Injector, libc_fails_like_the_os
from pyvattn._ffi import libc
from pyvattn.backends.host import HostBackend

P = 4096


@pytest.fixture
def backend():
    b = HostBackend(page_size=P)
    yield b
    b.close()


def _bytes(backend, va: int) -> torch.Tensor:
    base = next(b for b, t in backend._tables.items() if b <= va < b + len(t) * P)
    return backend.tensor(base, len(backend._tables[base]) * P)[va - base:va - base + P]


def test_one_page_at_two_addresses_is_one_memory_counted_once(backend):
    base = backend.reserve(16 * P)
    a, b = base + 2 * P, base + 9 * P
    (h,) = backend.create_pages(1)
    backend.map([a], [h])
    with pytest.raises(ValueError, match="already mapped"):
        backend.map([b], [h])  # a second mapping must be asked for
    backend.map([b], [h], share=True)
    assert backend.refs([h]).tolist() == [2]
    assert backend.mapped_pages == 2 and backend.mapped_handles == 1
    _bytes(backend, a)[:] = 7
    assert bool((_bytes(backend, b) == 7).all()), "the second mapping is not the same memory"
    check_host_backend(backend)
    assert backend.allocated_bytes() == P  # one page of memory, whatever maps it
    with pytest.raises(ValueError, match="not live, unmapped"):
        backend.release_pages([h])
    assert backend.unmap([a]) == []  # still mapped at b: not free yet
    assert backend.refs([h]).tolist() == [1] and bool((_bytes(backend, b) == 7).all())
    check_host_backend(backend)
    assert backend.unmap([b]) == [h]  # its last mapping
    backend.release_pages([h])
    check_host_backend(backend)


def test_unmapping_every_mapping_in_one_batch_returns_the_page_once(backend):
    base = backend.reserve(16 * P)
    hs = backend.create_pages(3)
    backend.map([base, base + P, base + 2 * P], hs)
    backend.map([base + 8 * P, base + 9 * P], hs[:2], share=True)  # a forked prefix of two pages
    assert sorted(backend.unmap([base + 8 * P, base, base + 9 * P, base + P])) == sorted(hs[:2])
    assert backend.refs(hs).tolist() == [0, 0, 1]
    check_host_backend(backend)


def test_map_still_refuses_a_handle_twice_in_one_batch_and_a_mapped_va(backend):
    base = backend.reserve(8 * P)
    (h,) = backend.create_pages(1)
    with pytest.raises(ValueError, match="distinct"):
        backend.map([base, base + P], [h, h])
    backend.map([base], [h])
    with pytest.raises(ValueError, match="already mapped"):
        backend.map([base], [h], share=True)
    check_host_backend(backend)


def test_a_driver_cap_on_mappings_per_page_is_a_clear_error(backend):
    backend.max_mappings = 2
    base = backend.reserve(8 * P)
    (h,) = backend.create_pages(1)
    backend.map([base], [h])
    backend.map([base + P], [h], share=True)
    with pytest.raises(ValueError, match="at 2 VAs, the most"):
        backend.map([base + 2 * P], [h], share=True)
    assert backend.refs([h]).tolist() == [2]


def test_close_gives_back_shared_pages(backend):
    base = backend.reserve(8 * P)
    hs = backend.create_pages(2)
    backend.map([base, base + P], hs)
    backend.map([base + 4 * P, base + 5 * P], hs, share=True)
    backend.close()
    assert backend._fd == -1 and not backend._tables


@pytest.mark.parametrize("op", ["map", "unmap"])
def test_shared_mappings_at_every_driver_call(monkeypatch, op):
    """Sharing a prefix of pages (and taking it back) with a failure at each call: the books equal
    /proc/self/maps and the memfd, and the first mapping's data is untouched."""
    for at in range(1, 8):
        b = HostBackend(page_size=P)
        try:
            base = b.reserve(32 * P)
            src = [base + i * P for i in range(4)]
            dst = [base + (16 + i) * P for i in (0, 1, 2, 3)]
            hs = b.create_pages(4, at=b.placement(src))
            b.map(src, hs)
            for i, va in enumerate(src):
                _bytes(b, va)[:] = i + 1
            if op == "unmap":
                b.map(dst, hs, share=True)
            injector = Injector(at, fail=libc_fails_like_the_os if at % 2 else None)
            with monkeypatch.context() as mp:
                injector.install(mp, libc, HOST_DRIVER_CALLS)
                try:
                    b.map(dst, hs, share=True) if op == "map" else b.unmap(dst[1:3])
                except EXPECTED:
                    pass
            check_host_backend(b)
            refs = b.refs(hs)
            mapped_dst = b.handles_at(dst) != -1
            assert (refs == 1 + mapped_dst).all()
            for i, va in enumerate(src):
                assert bool((_bytes(b, va) == i + 1).all())
            for i in np.flatnonzero(mapped_dst).tolist():
                assert bool((_bytes(b, dst[i]) == i + 1).all())
        finally:
            b.close()

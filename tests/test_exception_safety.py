"""An exception at any call under the cache (KeyboardInterrupt included) leaves the books equal to
reality, every handle accounted for and every written token intact; the cache keeps working and
gives everything back (issue 11, item 3). Each test injects at every call index in turn.

The review's cases, each one index of these sweeps: a KeyboardInterrupt inside trim()'s unmap
loop left pages inaccessible that the table counted as mapped (the next request segfaulted); one
inside the map loop left a page mapped at a VA the table called free, then mapped again under
another slot (r2, r3); an unmap that failed half-way leaked pages (partial_unmap_error).
cuda-vmm and uvm64k run the same sweeps against their stub drivers in test_cuda_ffi.py and
test_uvm_backend.py.
"""

from __future__ import annotations

import pytest
import torch

from faults import BACKEND_CALLS, EXPECTED, HOST_DRIVER_CALLS, POOL_CALLS, Injector, libc_fails_like_the_os, sweep
from pyvattn import KVCache
from pyvattn._ffi import libc
from pyvattn.backends.host import HostBackend

P = 4096


def _cache(deferred: bool) -> KVCache:
    # 256 B per token: 16 tokens per page; 2 layers: 4 regions; a budget the workload exceeds
    return KVCache(2, 1, 64, 4, 256, torch.float32, device="cpu", page_size=P, backend="host",
                   memory_budget=48 * P, deferred_reclaim=deferred)


def _host_closed(backend) -> None:
    """Everything went back: the memfd is closed, and no mapping is left in the reservation."""
    assert backend._fd == -1 and not backend._tables


def _sweep(install, error, persistent=False, fail=None, deferred=True) -> int:
    return sweep(lambda: _cache(deferred), install, error=error, persistent=persistent, fail=fail,
                 after_close=_host_closed)


def _host_driver(mp, cache, injector):
    injector.install(mp, libc, HOST_DRIVER_CALLS)


def _backend_and_pool(mp, cache, injector):
    injector.install(mp, cache.backend, BACKEND_CALLS)
    injector.install(mp, cache.pool, POOL_CALLS)


@pytest.mark.parametrize("deferred", [True, False], ids=["deferred", "eager"])
def test_keyboard_interrupt_at_every_driver_call(deferred):
    assert _sweep(_host_driver, KeyboardInterrupt(), deferred=deferred) > 20


def test_enomem_at_every_driver_call():
    assert _sweep(_host_driver, None, fail=libc_fails_like_the_os) > 20


def test_every_driver_call_failing_from_some_point_on_rollbacks_included():
    """The failure persists: the rollback's own calls fail too. The books then keep what could
    not be taken back, and the cache still works once the failure is gone."""
    assert _sweep(_host_driver, KeyboardInterrupt(), persistent=True) > 20


def test_keyboard_interrupt_at_every_backend_and_pool_call():
    assert _sweep(_backend_and_pool, KeyboardInterrupt()) > 10


@pytest.mark.parametrize("op", ["create", "map", "unmap", "release"])
def test_host_backend_alone_at_every_driver_call(monkeypatch, op):
    """The backend without the cache: each operation with a failure at each of its calls, then
    the books against /proc/self/maps and the memfd."""
    from books import check_host_backend

    for at in range(1, 12):
        b = HostBackend(page_size=P)
        try:
            base = b.reserve(64 * P)
            vas = [base + i * P for i in (0, 1, 2, 5, 6, 9, 12, 13, 14, 15)]  # 4 runs
            handles = b.create_pages(len(vas), at=b.placement(vas)) if op != "create" else None
            if op in ("unmap", "release"):
                b.map(vas, handles)
            if op == "release":
                b.unmap(vas)
            injector = Injector(at, fail=libc_fails_like_the_os if at % 2 else None)
            with monkeypatch.context() as mp:
                injector.install(mp, libc, HOST_DRIVER_CALLS)
                try:
                    if op == "create":
                        b.create_pages(len(vas), at=b.placement(vas))
                    elif op == "map":
                        b.map(vas, handles)
                    elif op == "unmap":
                        b.unmap(vas)
                    else:
                        b.release_pages(handles)
                except EXPECTED:
                    pass
            check_host_backend(b)
        finally:
            b.close()

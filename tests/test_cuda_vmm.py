"""The cuda-vmm backend on a real GPU: mapping, data integrity, batching of access setting,
synchronization before unmap, running out of memory, and returning everything on close.

The core KVCache suite (tests/test_kvcache.py) also runs on cuda-vmm through conftest's fixture.
"""

from __future__ import annotations

import threading

import pytest
import torch

from pyvattn import KVCache, OutOfPages, backends

pytestmark = pytest.mark.gpu

MiB = 1 << 20


def _skip_reason() -> str | None:
    if not torch.cuda.is_available():
        return "no CUDA device visible to torch"
    probe = backends.probe("cuda-vmm", torch.device("cuda"))
    return None if probe.available else f"cuda-vmm unavailable: {probe.reason}"


@pytest.fixture
def backend():
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    from pyvattn.backends.cuda_vmm import CudaVmmBackend

    torch.cuda.init()
    b = CudaVmmBackend(torch.device("cuda"), CudaVmmBackend.granularity(torch.device("cuda")))
    yield b
    b.close()


def _page_view(backend, base, index, dtype=torch.int32):
    P = backend.page_size
    return backend.tensor(base + index * P, P).view(dtype)


def test_probe_and_describe(backend):
    info = backend.describe()
    assert info["backend"] == "cuda-vmm" and info["granularity"] == backend.page_size
    assert info["driver_version"] and info["device_name"]
    free, total = backend.mem_info()
    assert 0 < free <= total
    base = backend.reserve(2 * backend.page_size)
    t = backend.tensor(base, 2 * backend.page_size)  # a view of reserved, unmapped VA is fine
    assert t.device == torch.device("cuda", torch.cuda.current_device()) and t.data_ptr() == base
    del t
    backend.unreserve(base, 2 * backend.page_size)


def test_map_write_unmap_remap_keeps_page_contents(backend):
    P = backend.page_size
    base = backend.reserve(16 * P)
    handles = backend.create_pages(4)
    backend.map([base + i * P for i in range(4)], handles)
    for i in range(4):
        _page_view(backend, base, i).fill_(1000 + i)
    torch.cuda.synchronize()
    backend.unmap([base + i * P for i in range(4)])
    # the same physical pages, mapped elsewhere in reverse order, still hold their data
    backend.map([base + (12 + i) * P for i in range(4)], handles[::-1])
    for i in range(4):
        got = _page_view(backend, base, 12 + i)
        assert torch.all(got == 1000 + 3 - i), f"page {i} lost its contents"
    backend.unmap([base + (12 + i) * P for i in range(4)])
    backend.release_pages(handles)
    backend.unreserve(base, 16 * P)


def test_set_access_once_per_contiguous_run(backend):
    P = backend.page_size
    base = backend.reserve(16 * P)
    handles = backend.create_pages(8)
    before = dict(backend.calls)
    pages = [9, 0, 1, 2, 3, 7, 8, 10]  # runs: 0-3, 7-10
    backend.map([base + p * P for p in pages], handles)
    assert backend.calls["cuMemMap"] - before.get("cuMemMap", 0) == 8
    assert backend.calls["cuMemSetAccess"] - before.get("cuMemSetAccess", 0) == 2
    for p in pages:
        _page_view(backend, base, p).fill_(p)
    torch.cuda.synchronize()
    for p in pages:
        assert torch.all(_page_view(backend, base, p) == p)
    backend.unmap([base + p * P for p in pages])
    backend.release_pages(handles)
    backend.unreserve(base, 16 * P)


def test_map_is_checked_before_any_driver_call(backend):
    P = backend.page_size
    base = backend.reserve(4 * P)
    handles = backend.create_pages(3)
    backend.map([base], handles[:1])
    calls = dict(backend.calls)
    with pytest.raises(ValueError, match="already mapped"):
        backend.map([base + P, base], handles[1:])
    with pytest.raises(ValueError, match="reservation"):
        backend.map([base + 4 * P], handles[1:2])
    with pytest.raises(ValueError, match="handles"):
        backend.map([base + P], handles[:1])  # mapped already elsewhere
    assert dict(backend.calls) == calls
    backend.map([base + P, base + 2 * P], handles[1:])  # the batch is still free to map
    backend.unmap([base, base + P, base + 2 * P])
    backend.release_pages(handles)
    backend.unreserve(base, 4 * P)


def test_unmap_waits_for_kernels_still_reading(backend):
    P = backend.page_size
    base = backend.reserve(2 * P)
    (h,) = backend.create_pages(1)
    backend.map([base], [h])
    page = _page_view(backend, base, 0, torch.float32)
    page.fill_(3.0)
    torch.cuda._sleep(200_000_000)  # keep the stream busy (~0.1 s), then read the page
    total = page.sum()
    backend.unmap([base])  # must not pull the page from under the queued read
    torch.cuda.synchronize()
    assert total.item() == 3.0 * page.numel()
    backend.release_pages([h])
    backend.unreserve(base, 2 * P)


def test_map_from_a_thread_without_a_current_context(backend):
    P = backend.page_size
    base = backend.reserve(2 * P)
    handles = backend.create_pages(2)
    errors = []

    def work():
        try:
            backend.map([base, base + P], handles)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    t = threading.Thread(target=work)
    t.start()
    t.join()
    assert not errors, errors
    page = backend.tensor(base, 2 * P).view(torch.int64)
    page.fill_(42)
    assert int(page.sum()) == 42 * page.numel()
    backend.unmap([base, base + P])
    backend.release_pages(handles)
    backend.unreserve(base, 2 * P)


def test_create_past_device_memory_is_out_of_pages_and_leaks_nothing(backend):
    P = backend.page_size
    free, _ = backend.mem_info()
    with pytest.raises(OutOfPages):
        backend.create_pages(free // P + 64)
    after, _ = backend.mem_info()
    assert after >= free - 64 * MiB  # everything created before the failure was released


def test_close_returns_all_device_memory():
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    from pyvattn.backends.cuda_vmm import CudaVmmBackend

    torch.cuda.init()
    P = CudaVmmBackend.granularity(torch.device("cuda"))
    b = CudaVmmBackend(torch.device("cuda"), P)
    free0, _ = b.mem_info()
    base = b.reserve(256 * P)
    handles = b.create_pages(128)
    b.map([base + i * P for i in range(64)], handles[:64])
    assert b.mem_info()[0] <= free0 - 128 * P + 32 * MiB
    b.close()
    b.close()  # idempotent
    b2 = CudaVmmBackend(torch.device("cuda"), P)
    try:
        assert b2.mem_info()[0] >= free0 - 32 * MiB
    finally:
        b2.close()


def test_kvcache_budget_gives_out_of_pages_and_stays_usable():
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    # 8 heads x 128 dim x fp16 = 2 KiB per token: a 2 MiB page holds 1024 tokens of one layer's K
    with KVCache(4, 8, 128, max_batch_size=4, max_seq_len=8192, dtype=torch.float16, device="cuda",
                 backend="cuda-vmm", memory_budget=16 * 8 * MiB) as cache:  # 64 pages = 8 per region
        a, b = cache.alloc_slot(), cache.alloc_slot()
        cache.step({a: 4096})  # 4 pages per region
        cache.k[3][a, :4096] = 1.5
        with pytest.raises(OutOfPages):
            cache.step({a: 4096, b: 5000})  # 5 more per region: over budget
        assert torch.all(cache.k[3][a, :4096] == 1.5)
        cache.step({a: 4096, b: 4000})  # exactly the budget
        cache.k[0][b, :4000] = 2.0
        torch.cuda.synchronize()
        assert torch.all(cache.k[0][b, :4000] == 2.0) and torch.all(cache.k[3][a, :4096] == 1.5)
        assert cache.stats()["backend"] == "cuda-vmm"

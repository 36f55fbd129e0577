"""The CUDA driver declarations and the DLPack view helper, checked without a GPU."""

from __future__ import annotations

import ctypes
import gc
import platform

import numpy as np
import pytest
import torch

from cudastub import ACCESS, GRAN, MAP, SYNC, UNMAP, stub, stub_library  # noqa: F401 (fixtures)
from pyvattn import BackendUnavailable
from pyvattn._ffi import cuda
from pyvattn._ffi.dlpack import device_tensor
from pyvattn.errors import CudaError, DriverError

LP64 = ctypes.sizeof(ctypes.c_void_p) == 8 and platform.system() == "Linux"


def _libcuda_loads() -> bool:
    try:
        cuda.open_library()
    except BackendUnavailable:
        return False
    return True


@pytest.mark.skipif(not LP64, reason="layouts below are cuda.h's on 64-bit Linux")
def test_struct_layouts_match_cuda_h():
    ffi = cuda.ffi
    # CUmemLocation { CUmemLocationType type; int id; }
    assert ffi.sizeof("CUmemLocation") == 8
    assert ffi.offsetof("CUmemLocation", "id") == 4
    # CUmemAllocationProp { type; requestedHandleTypes; location; void *win32HandleMetaData;
    #                       struct { uchar compressionType, gpuDirectRDMACapable; ushort usage;
    #                                uchar reserved[4]; } allocFlags; }
    assert ffi.sizeof("CUmemAllocationProp") == 32
    assert ffi.alignof("CUmemAllocationProp") == 8
    for field, offset in [("type", 0), ("requestedHandleTypes", 4), ("location", 8),
                          ("win32HandleMetaData", 16), ("allocFlags", 24)]:
        assert ffi.offsetof("CUmemAllocationProp", field) == offset, field
    prop = ffi.new("CUmemAllocationProp *")
    assert ffi.sizeof(prop.allocFlags) == 8
    # CUmemAccessDesc { CUmemLocation location; CUmemAccess_flags flags; }
    assert ffi.sizeof("CUmemAccessDesc") == 12
    assert ffi.offsetof("CUmemAccessDesc", "flags") == 8
    assert ffi.sizeof("CUuuid") == 16
    assert ffi.sizeof("CUdeviceptr") == ffi.sizeof("CUmemGenericAllocationHandle") == 8


def test_alloc_flags_subfields_sit_where_the_driver_reads_them():
    prop = cuda.allocation_prop(3)
    prop.allocFlags.usage = 0xBEEF
    prop.allocFlags.gpuDirectRDMACapable = 1
    raw = bytes(cuda.ffi.buffer(prop))
    assert raw[0:4] == (1).to_bytes(4, "little")  # CU_MEM_ALLOCATION_TYPE_PINNED
    assert raw[4:8] == bytes(4)  # no shareable handle types requested
    assert raw[8:16] == (1).to_bytes(4, "little") + (3).to_bytes(4, "little")  # device 3
    assert raw[24:32] == bytes([0, 1]) + (0xBEEF).to_bytes(2, "little") + bytes(4)


def test_access_desc_grants_read_write_on_the_device():
    desc = cuda.access_desc(1)
    assert (desc.location.type, desc.location.id, desc.flags) == (1, 1, 3)


def test_every_needed_function_is_declared():
    # Resolve each name against a library that lacks it: a declared name fails with "not found in
    # library", an undeclared one with "no function ... named".
    libc = cuda.ffi.dlopen(None)
    names = ["cuInit", "cuDriverGetVersion", "cuDeviceGet", "cuDeviceGetCount", "cuDeviceGetName",
             "cuDeviceGetUuid", "cuDeviceGetUuid_v2", "cuDeviceGetAttribute", "cuDeviceTotalMem_v2",
             "cuDevicePrimaryCtxRetain", "cuDevicePrimaryCtxRelease_v2", "cuCtxGetCurrent",
             "cuCtxSetCurrent", "cuCtxSynchronize", "cuMemGetAllocationGranularity",
             "cuMemAddressReserve", "cuMemAddressFree", "cuMemCreate", "cuMemRelease", "cuMemMap",
             "cuMemUnmap", "cuMemSetAccess", "cuMemGetAccess", "cuMemGetInfo_v2", "cuGetErrorName", "cuGetErrorString"]
    for name in names:
        with pytest.raises(AttributeError, match="not found in library"):
            getattr(libc, name)
    with pytest.raises(AttributeError) as info:
        _ = libc.cuMemGetInfo  # the unversioned name is not what cuda.h programs call
    assert "not found in library" not in str(info.value)


def test_error_names_from_the_builtin_table():
    assert cuda.ERROR_NAMES[2] == "CUDA_ERROR_OUT_OF_MEMORY"
    if not _libcuda_loads():
        assert cuda.error_name(2) == "CUDA_ERROR_OUT_OF_MEMORY"
        assert cuda.error_name(801) == "CUDA_ERROR_NOT_SUPPORTED"
    assert cuda.error_name(123456).startswith("CUDA_ERROR_")


def test_check_raises_cuda_error_with_the_status_name():
    cuda.check("cuMemCreate", cuda.CUDA_SUCCESS)  # no error
    with pytest.raises(CudaError) as info:
        cuda.check("cuMemCreate", 2)
    err = info.value
    assert isinstance(err, DriverError)
    assert (err.call, err.status, err.code) == ("cuMemCreate", "CUDA_ERROR_OUT_OF_MEMORY", 2)
    assert "cuMemCreate failed: CUDA_ERROR_OUT_OF_MEMORY (2)" in str(err)


def test_missing_library_is_backend_unavailable():
    with pytest.raises(BackendUnavailable, match="libcuda-does-not-exist"):
        cuda.open_library(["libcuda-does-not-exist.so.1"])


def test_use_library_loads_a_given_driver_once(stub_library, monkeypatch):
    monkeypatch.setattr(cuda, "_lib", None)
    monkeypatch.setattr(cuda, "_lib_path", None)
    monkeypatch.setattr(cuda, "_init_status", None)
    with pytest.raises(BackendUnavailable, match="no-such-libcuda"):
        cuda.use_library("/nonexistent/no-such-libcuda.so")
    cuda.use_library(str(stub_library))
    cuda.use_library(str(stub_library))  # the same library again: nothing to do
    assert cuda.device_name(cuda.device_get(0)) == "Stub GPU"
    with pytest.raises(RuntimeError, match="already loaded"):
        cuda.use_library("libcuda.so.1")


@pytest.mark.skipif(_libcuda_loads(), reason="libcuda is installed here")
def test_lazy_load_without_libcuda():
    with pytest.raises(BackendUnavailable, match="NVIDIA driver"):
        cuda.lib()
    with pytest.raises(BackendUnavailable):
        cuda.init()
    from pyvattn.backends.cuda_vmm import CudaVmmBackend

    probe = CudaVmmBackend.probe(torch.device("cuda"))
    assert not probe.available and "libcuda" in probe.reason
    assert not CudaVmmBackend.probe(torch.device("cpu")).available


# --- DLPack views (the same code path as kDLCUDA, on CPU memory) ----------------------------------
def test_device_tensor_is_a_zero_copy_view():
    buf = np.zeros(4096, dtype=np.uint8)
    t = device_tensor(buf.ctypes.data, buf.nbytes, torch.device("cpu"))
    assert t.dtype == torch.uint8 and t.shape == (4096,) and t.device.type == "cpu"
    assert t.data_ptr() == buf.ctypes.data
    # write through the tensor (any dtype), read through numpy
    t.view(torch.float16)[10:20] = torch.arange(10, dtype=torch.float16)
    assert np.array_equal(buf.view(np.float16)[10:20], np.arange(10, dtype=np.float16))
    t[:8].view(torch.float64)[0] = 2.5
    assert buf[:8].view(np.float64)[0] == 2.5
    # write through numpy, read through the tensor
    buf[4000:4004] = [1, 2, 3, 4]
    assert t[4000:4004].tolist() == [1, 2, 3, 4]


def test_device_tensor_views_outlive_the_first_tensor():
    buf = np.arange(256, dtype=np.uint8)
    t = device_tensor(buf.ctypes.data, 256, torch.device("cpu"))
    view = t[100:110].clone(), t[200:]
    del t
    gc.collect()
    assert view[1][:3].tolist() == [200, 201, 202]
    assert view[0].tolist() == list(range(100, 110))


def test_device_tensor_rejects_bad_arguments():
    with pytest.raises(ValueError, match="ptr"):
        device_tensor(0, 16, torch.device("cpu"))
    with pytest.raises(ValueError, match="nbytes"):
        device_tensor(0x1000, 0, torch.device("cpu"))
    with pytest.raises(ValueError, match="device"):
        device_tensor(0x1000, 16, torch.device("meta"))


def test_device_tensor_headers_are_freed_by_torch():
    import resource

    buf = np.zeros(64, dtype=np.uint8)
    for _ in range(20000):
        device_tensor(buf.ctypes.data, 64, torch.device("cpu"))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for _ in range(50000):
        device_tensor(buf.ctypes.data, 64, torch.device("cpu"))
    grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    assert grown_kib < 2048  # a leaked ~100-byte header each would be ~5 MiB


# --- the backend's call sequences, against the stub driver (tests/cudastub.py) ---------------------
# They check *what the backend asks of the driver*: argument values, call counts and order, roll-back
# on failure, context handling on other threads. tests/test_cuda_vmm.py checks the real driver on a GPU.

def _backend():
    from pyvattn.backends.cuda_vmm import CudaVmmBackend

    return CudaVmmBackend(torch.device("cuda"), GRAN)


def test_stub_probe_granularity_and_describe(stub):
    from pyvattn.backends.cuda_vmm import CudaVmmBackend

    p = CudaVmmBackend.probe(torch.device("cuda"))
    assert p.available and "Stub GPU" in p.reason and "2048 KiB" in p.reason and "12.4" in p.reason
    assert not CudaVmmBackend.probe(torch.device("cuda:3")).available
    assert CudaVmmBackend.granularity(torch.device("cuda")) == GRAN
    with pytest.raises(ValueError, match="page_size"):
        CudaVmmBackend.check_page_size(torch.device("cuda"), 3 << 20)
    b = _backend()
    info = b.describe()
    assert info["driver_version"] == "12.4" and info["device_name"] == "Stub GPU" and info["granularity"] == GRAN
    assert b.mem_info()[0] > 0
    b.close()
    assert stub.stub_ctx_refs() == 0


def test_stub_map_sets_access_once_per_run_and_unmap_syncs_first(stub):
    b = _backend()
    assert stub.stub_ctx_refs() == 1
    base = b.reserve(16 * GRAN)
    assert base % GRAN == 0
    handles = b.create_pages(8)
    pages = [9, 0, 1, 2, 3, 7, 8, 10]  # runs 0-3 and 7-10
    b.map([base + p * GRAN for p in pages], handles)
    assert stub.stub_calls[MAP] == 8 and stub.stub_calls[ACCESS] == 2
    assert stub.stub_accessible_mappings() == 8
    b.unmap([base + p * GRAN for p in (0, 1, 7)])
    assert stub.stub_calls[SYNC] == 1 and stub.stub_calls[UNMAP] == 3
    assert stub.stub_last_sync_before_unmap == 1  # the sync came before the unmaps
    with pytest.raises(ValueError, match="not mapped"):
        b.unmap([base])
    freed = [handles[pages.index(p)] for p in (0, 1, 7)]
    with pytest.raises(ValueError, match="not live, unmapped"):
        b.release_pages([handles[pages.index(2)]])  # still mapped
    b.release_pages(freed)
    assert stub.stub_live_handles() == 5
    with pytest.raises(ValueError, match="mapped pages"):
        b.unreserve(base, 16 * GRAN)
    b.close()
    assert (stub.stub_live_handles(), stub.stub_live_mappings(), stub.stub_live_reservations(),
            stub.stub_ctx_refs()) == (0, 0, 0, 0)
    b.close()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        b.reserve(GRAN)


def test_stub_create_is_all_or_nothing_and_oom_is_out_of_pages(stub):
    from pyvattn import OutOfPages

    stub.stub_set_limit(10)
    b = _backend()
    kept = b.create_pages(4)
    with pytest.raises(OutOfPages) as info:
        b.create_pages(7)
    assert info.value.needed == 7
    assert stub.stub_live_handles() == 4  # the 6 made before the failure were released
    assert len(b.create_pages(6)) == 6 and stub.stub_live_handles() == 10
    b.release_pages(kept)
    b.close()
    assert stub.stub_live_handles() == 0


@pytest.mark.parametrize("fail", ["map", "access"])
def test_stub_map_failure_rolls_back_the_whole_batch(stub, fail):
    from pyvattn import OutOfPages

    b = _backend()
    base = b.reserve(8 * GRAN)
    handles = b.create_pages(6)
    b.map([base], handles[:1])
    if fail == "map":
        stub.stub_fail_map_after = 3  # the 4th cuMemMap of the batch fails
        with pytest.raises(CudaError) as info:
            b.map([base + i * GRAN for i in range(1, 6)], handles[1:])
        assert info.value.status == "CUDA_ERROR_MAP_FAILED" and info.value.call == "cuMemMap"
        stub.stub_fail_map_after = -1
    else:
        stub.stub_fail_access = 1
        with pytest.raises(OutOfPages):
            b.map([base + i * GRAN for i in range(1, 6)], handles[1:])
        stub.stub_fail_access = 0
    assert stub.stub_live_mappings() == 1  # only the page mapped before the batch
    b.map([base + i * GRAN for i in range(1, 6)], handles[1:])  # the backend's books agree
    assert stub.stub_accessible_mappings() == 6
    b.close()
    assert stub.stub_live_mappings() == stub.stub_live_handles() == 0


def test_stub_unmap_failure_part_way_keeps_exact_books(stub):
    """The third cuMemUnmap fails: the two before it are unmapped for good (and the error says
    so), the rest stays mapped, and everything can still be unmapped and closed."""
    b = _backend()
    base = b.reserve(8 * GRAN)
    handles = b.create_pages(5)
    vas = [base + i * GRAN for i in range(5)]
    b.map(vas, handles)
    stub.stub_fail_unmap_after = 2
    with pytest.raises(CudaError) as info:
        b.unmap(vas)
    stub.stub_fail_unmap_after = -1
    assert info.value.unmapped_vas == vas[:2] and stub.stub_live_mappings() == 3
    with pytest.raises(ValueError, match="not mapped"):
        b.unmap(vas[:1])
    b.unmap(vas[2:])
    b.close()
    assert stub.stub_live_mappings() == stub.stub_live_handles() == 0


def test_stub_calls_from_a_thread_with_no_current_context(stub):
    import threading

    b = _backend()
    base = b.reserve(4 * GRAN)
    handles = b.create_pages(4)
    errors = []

    def work():
        try:
            b.map([base + i * GRAN for i in range(4)], handles)
            b.unmap([base + 3 * GRAN])
        except BaseException as exc:
            errors.append(exc)

    t = threading.Thread(target=work)
    t.start()
    t.join()
    assert not errors, errors
    assert stub.stub_live_mappings() == 3 and stub.stub_calls[ACCESS] == 1
    b.close()


def test_stub_error_names_come_from_the_driver(stub):
    cuda.lib()
    assert cuda.error_name(205) == "CUDA_ERROR_MAP_FAILED"
    assert cuda.error_name(801) == "CUDA_ERROR_NOT_SUPPORTED"  # the stub does not know it: table
    with pytest.raises(CudaError, match="stub driver error"):
        cuda.check("cuMemMap", 205)


def test_stub_kvcache_workload_through_the_cuda_vmm_backend(stub, monkeypatch):
    """KVCache on backend="cuda-vmm" over the stub driver, whose pages are host memory: growth,
    step_async, reclaim under a budget (unmap + remap), OutOfPages and close, with every value
    checked. Tensor views are made on the CPU (the same DLPack helper, kDLCPU) since this torch has
    no CUDA; everything else is the backend's real code."""
    from kvdata import check, write
    from pyvattn import KVCache, OutOfPages
    from pyvattn.backends.cuda_vmm import CudaVmmBackend

    monkeypatch.setattr(CudaVmmBackend, "tensor", lambda self, base, n: device_tensor(base, n, torch.device("cpu")))
    # 2 KV heads x 64 x fp32 = 512 B per token: 4096 tokens per 2 MiB page, 3 pages per slot
    cache = KVCache(2, 2, 64, max_batch_size=4, max_seq_len=10000, dtype=torch.float32, device="cuda",
                    backend="cuda-vmm", memory_budget=20 * GRAN)
    assert cache.selection.name == "cuda-vmm" and cache.page_size == GRAN
    a, b = cache.alloc_slot(), cache.alloc_slot()
    cache.step({a: 5000, b: 100})
    write(cache, a, 1, 0, 5000)
    write(cache, b, 2, 0, 100)
    cache.step_async({a: 9000, b: 4097})  # 5 pages per region: the whole budget
    cache.step({a: 9000, b: 4097})
    write(cache, a, 1, 5000, 9000)
    write(cache, b, 2, 100, 4097)
    check(cache, a, 1, 9000)
    check(cache, b, 2, 4097)
    assert stub.stub_calls[ACCESS] < stub.stub_calls[MAP]  # runs, not pages
    cache.free_slot(a)
    c = cache.alloc_slot(seq_len=8000)
    assert c == a  # best fit: a's pages are still mapped
    cache.step({c: 8000})
    write(cache, c, 3, 0, 8000)
    d = cache.alloc_slot()
    with pytest.raises(OutOfPages):
        cache.step({d: 4000, b: 9000})
    check(cache, b, 2, 4097)
    check(cache, c, 3, 8000)
    cache.free_slot(c)
    syncs = stub.stub_calls[SYNC]
    cache.step({d: 4000})  # reclaims from the freed slot c: unmaps, after a sync
    assert stub.stub_calls[SYNC] > syncs and stub.stub_calls[UNMAP] > 0
    write(cache, d, 4, 0, 4000)
    check(cache, d, 4, 4000)
    check(cache, b, 2, 4097)
    s = cache.stats()
    assert s["backend"] == "cuda-vmm" and s["device_name"] == "Stub GPU" and s["physical_bytes"] <= 20 * GRAN
    cache.close()
    assert (stub.stub_live_handles(), stub.stub_live_mappings(), stub.stub_live_reservations(),
            stub.stub_ctx_refs()) == (0, 0, 0, 0)


def test_stub_fork_maps_one_handle_at_two_addresses(stub, monkeypatch):
    """Prefix sharing on cuda-vmm: a fork maps the source's handles (cuMemMap of the same handle
    at a second VA) and copies only the partial last page; the stub driver counts one handle and
    two mappings per shared page; data read back through both slots; everything released at close."""
    from kvdata import check, write
    from pyvattn import KVCache
    from pyvattn.backends.cuda_vmm import CudaVmmBackend

    monkeypatch.setattr(CudaVmmBackend, "tensor", lambda self, base, n: device_tensor(base, n, torch.device("cpu")))
    # 8 x 4096 fp32 = 128 KiB per token: 16 tokens per 2 MiB page
    cache = KVCache(1, 8, 4096, max_batch_size=2, max_seq_len=64, dtype=torch.float32, device="cuda",
                    backend="cuda-vmm")
    a = cache.alloc_slot()
    cache.step({a: 40})
    write(cache, a, 1, 0, 40)
    in_use = lambda: cache.pool.total_pages - cache.pool.free_pages  # noqa: E731
    before, maps = in_use(), stub.stub_live_mappings()
    b = cache.fork(a, 37)  # two whole pages shared, the third copied
    assert stub.stub_live_mappings() == maps + 3 * cache.num_regions
    assert in_use() == before + cache.num_regions  # only the copied page is new memory
    assert stub.stub_live_handles() == cache.pool.total_pages
    assert cache.stats()["shared_pages"] == 2 * cache.num_regions
    check(cache, b, 1, 37)
    cache.step({b: 50, a: 48})
    write(cache, b, 2, 37, 50)
    write(cache, a, 1, 40, 48)
    check(cache, a, 1, 48)
    check(cache, b, 1, 37)
    check(cache, b, 2, 50, 37)
    cache.free_slot(a)
    cache.trim()
    check(cache, b, 1, 37)
    assert stub.stub_live_handles() == stub.stub_live_mappings() == 4 * cache.num_regions
    cache.close()
    assert (stub.stub_live_handles(), stub.stub_live_mappings(), stub.stub_live_reservations(),
            stub.stub_ctx_refs()) == (0, 0, 0, 0)


# --- exception safety: a failure at every driver call of a KVCache workload --------------------
CUDA_DRIVER_CALLS = ("cuMemCreate", "cuMemRelease", "cuMemMap", "cuMemUnmap", "cuMemSetAccess",
                     "cuCtxSynchronize", "cuMemAddressReserve", "cuMemAddressFree")


class _CountedDriver:
    """The stub library with its memory calls going through an Injector."""

    def __init__(self, lib, injector):
        self._lib, self._injector = lib, injector

    def __getattr__(self, name):
        fn = getattr(self._lib, name)
        return self._injector.wrap(name, fn) if name in CUDA_DRIVER_CALLS else fn


@pytest.mark.parametrize("workload", ["plain", "fork"])
@pytest.mark.parametrize("failure", ["KeyboardInterrupt", "driver status"])
def test_stub_kvcache_books_equal_the_driver_after_a_failure_at_every_call(stub_library, tmp_path,
                                                                          monkeypatch, failure, workload):
    """tests/test_exception_safety.py's sweep on cuda-vmm: the workload (growth, step_async,
    reclaim under a budget, reserve, trim, frees; with ``fork``, prefix sharing: one handle mapped
    at two addresses, test_fork.py's workload) with one driver call failing, at each index in
    turn; after each: the books against the stub driver's own state, and everything released at
    close. A fresh stub each run (the stub never reuses its table entries)."""
    from cudastub import install
    from faults import ForkWorkload, Workload, sweep
    from pyvattn import KVCache
    from pyvattn.backends.cuda_vmm import CudaVmmBackend

    monkeypatch.setattr(CudaVmmBackend, "tensor", lambda self, base, n: device_tensor(base, n, torch.device("cpu")))
    state = {}

    def fresh(at):
        state["stub"] = install(stub_library, tmp_path / f"libcuda-{at}.so.1", monkeypatch)

    def make():  # 8 x 4096 fp32 = 128 KiB per token: 16 tokens per 2 MiB page, as the workload wants
        return KVCache(2, 8, 4096, max_batch_size=4, max_seq_len=256, dtype=torch.float32, device="cuda",
                       backend="cuda-vmm", memory_budget=(64 if workload == "fork" else 48) * GRAN)

    def count_driver_calls(mp, cache, injector):
        mp.setattr(cuda, "_lib", _CountedDriver(cuda._lib, injector))

    def reality(cache):
        books, stub = cache.backend.books(), state["stub"]
        assert stub.stub_live_mappings() == stub.stub_accessible_mappings() == len(books["mapped"])
        assert stub.stub_live_handles() == len(books["live"])

    def closed(backend):
        stub = state["stub"]
        assert (stub.stub_live_handles(), stub.stub_live_mappings(), stub.stub_live_reservations(),
                stub.stub_ctx_refs()) == (0, 0, 0, 0)

    fail = None if failure == "KeyboardInterrupt" else \
        (lambda name, fn, args: 2 if name in ("cuMemCreate", "cuMemMap", "cuMemSetAccess") else 999)
    assert sweep(make, count_driver_calls, error=KeyboardInterrupt(), fail=fail, data=False,
                 reality=reality, after_close=closed, before_each=fresh,
                 workload=ForkWorkload if workload == "fork" else Workload) > 50

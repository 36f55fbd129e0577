"""The CUDA driver declarations and the DLPack view helper, checked without a GPU."""

from __future__ import annotations

import ctypes
import gc
import platform

import numpy as np
import pytest
import torch

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
             "cuMemUnmap", "cuMemSetAccess", "cuMemGetInfo_v2", "cuGetErrorName", "cuGetErrorString"]
    for name in names:
        with pytest.raises(AttributeError, match="not found in library"):
            getattr(libc, name)
    with pytest.raises(AttributeError) as info:
        libc.cuMemGetInfo  # the unversioned name is not what cuda.h programs call
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


# --- the backend's call sequences, against a stub driver ------------------------------------------
# No GPU here, so the Python side of the cuda-vmm backend is driven against a small C stand-in for
# libcuda (compiled at test time). It keeps the state a driver would (reservations, handles,
# mappings, access, the current context per thread) and rejects what the real API rejects, so
# these tests check *what the backend asks of the driver*: argument values, call counts and order,
# roll-back on failure, context handling on other threads. They prove nothing about the real driver:
# tests/test_cuda_vmm.py does that on a GPU.
STUB_C = r"""
/* A strict stand-in for the libcuda VMM subset: driver-like state to check call sequences, and
   host memory behind "device" pages (a memfd), so mapped ranges can be read and written. */
#define _GNU_SOURCE
#include <fcntl.h>
#include <unistd.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <sys/mman.h>

#define GRAN (2u << 20)
#define MAXN 4096
typedef int CUresult;
typedef struct { int type; int id; } Loc;
typedef struct { int type; int handleTypes; Loc location; void *win32; unsigned char flags[8]; } Prop;
typedef struct { Loc location; int flags; } Access;

static int ctx_obj, ctx_refs, initialized;
static __thread void *current;
static struct { uint64_t base, size; } res[MAXN];
static struct { uint64_t size; int alive; } handles[MAXN];
static struct { uint64_t va, size, h; int access; } maps[MAXN];
static int nres, nhandles, nmaps, memfd = -1;
static long limit_pages = 1 << 30, used_pages;
int stub_calls[16];   /* 0 map, 1 setaccess, 2 unmap, 3 create, 4 release, 5 sync, 6 reserve, 7 free */
int stub_fail_map_after = -1, stub_fail_access = 0, stub_fail_unmap_after = -1;
uint64_t stub_last_sync_before_unmap;  /* stub_calls[5] when the last unmap ran */

void stub_set_limit(long pages) { limit_pages = pages; }
int stub_live_handles(void) { int n = 0; for (int i = 0; i < nhandles; i++) n += handles[i].alive; return n; }
int stub_live_mappings(void) { int n = 0; for (int i = 0; i < nmaps; i++) n += maps[i].size != 0; return n; }
int stub_accessible_mappings(void) { int n = 0; for (int i = 0; i < nmaps; i++) n += maps[i].size && maps[i].access; return n; }
int stub_live_reservations(void) { int n = 0; for (int i = 0; i < nres; i++) n += res[i].size != 0; return n; }
int stub_ctx_refs(void) { return ctx_refs; }

static int good_prop(const Prop *p) { return p && p->type == 1 && p->handleTypes == 0 && p->location.type == 1 && p->location.id == 0; }

CUresult cuInit(unsigned flags) { if (flags) return 1; initialized = 1; return 0; }
CUresult cuDriverGetVersion(int *v) { *v = 12040; return 0; }
CUresult cuGetErrorName(CUresult e, const char **s) {
    switch (e) {
    case 0: *s = "CUDA_SUCCESS"; return 0;
    case 1: *s = "CUDA_ERROR_INVALID_VALUE"; return 0;
    case 2: *s = "CUDA_ERROR_OUT_OF_MEMORY"; return 0;
    case 201: *s = "CUDA_ERROR_INVALID_CONTEXT"; return 0;
    case 205: *s = "CUDA_ERROR_MAP_FAILED"; return 0;
    default: *s = 0; return 1;
    }
}
CUresult cuGetErrorString(CUresult e, const char **s) { *s = "stub driver error"; return 0; }
CUresult cuDeviceGetCount(int *n) { if (!initialized) return 3; *n = 1; return 0; }
CUresult cuDeviceGet(int *d, int ord) { if (!initialized) return 3; if (ord != 0) return 101; *d = 0; return 0; }
CUresult cuDeviceGetName(char *name, int len, int dev) { strncpy(name, "Stub GPU", len); return 0; }
CUresult cuDeviceGetAttribute(int *v, int attr, int dev) { *v = attr == 102; return 0; }
CUresult cuDevicePrimaryCtxRetain(void **ctx, int dev) { *ctx = &ctx_obj; ctx_refs++; return 0; }
CUresult cuDevicePrimaryCtxRelease_v2(int dev) { if (ctx_refs <= 0) return 201; ctx_refs--; return 0; }
CUresult cuCtxGetCurrent(void **ctx) { if (!initialized) return 3; *ctx = current; return 0; }
CUresult cuCtxSetCurrent(void *ctx) { current = ctx; return 0; }
CUresult cuCtxSynchronize(void) { if (!current) return 201; stub_calls[5]++; return 0; }
CUresult cuMemGetInfo_v2(size_t *free, size_t *total) {
    if (!current) return 201; *total = (size_t)limit_pages * GRAN; *free = (size_t)(limit_pages - used_pages) * GRAN; return 0;
}
CUresult cuMemGetAllocationGranularity(size_t *g, const Prop *p, int opt) { if (!good_prop(p) || opt) return 1; *g = GRAN; return 0; }
CUresult cuMemAddressReserve(uint64_t *ptr, size_t size, size_t align, uint64_t addr, unsigned long long flags) {
    if (!size || size % GRAN || !align || align % GRAN || (align & (align - 1)) || addr || flags || nres == MAXN) return 1;
    char *raw = mmap(0, size + align, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (raw == MAP_FAILED) return 2;
    uint64_t base = ((uint64_t)raw + align - 1) / align * align;
    res[nres].base = base; res[nres].size = size; nres++; stub_calls[6]++;
    *ptr = base; return 0;
}
CUresult cuMemAddressFree(uint64_t ptr, size_t size) {
    for (int i = 0; i < nres; i++) if (res[i].size && res[i].base == ptr) {
        if (res[i].size != size) return 1;
        for (int j = 0; j < nmaps; j++) if (maps[j].size && maps[j].va >= ptr && maps[j].va < ptr + size) return 1;
        munmap((void *)ptr, size); res[i].size = 0; stub_calls[7]++; return 0;
    }
    return 1;
}
CUresult cuMemCreate(uint64_t *h, size_t size, const Prop *p, unsigned long long flags) {
    if (!good_prop(p) || flags || !size || size % GRAN || nhandles == MAXN) return 1;
    stub_calls[3]++;
    if (used_pages + (long)(size / GRAN) > limit_pages) return 2;
    if (memfd < 0) memfd = memfd_create("stub-cuda", MFD_CLOEXEC);
    if (memfd < 0 || ftruncate(memfd, (off_t)(nhandles + 1) * GRAN)) return 2;
    if (size != GRAN) return 801;  /* one granule per handle keeps the stub's memfd layout simple */
    used_pages += size / GRAN;
    handles[nhandles].size = size; handles[nhandles].alive = 1;
    *h = 1000 + nhandles++; return 0;
}
static int handle_index(uint64_t h) { long i = (long)h - 1000; return (i >= 0 && i < nhandles && handles[i].alive) ? (int)i : -1; }
CUresult cuMemRelease(uint64_t h) {
    int i = handle_index(h); if (i < 0) return 400;
    handles[i].alive = 0; used_pages -= handles[i].size / GRAN; stub_calls[4]++;
    fallocate(memfd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, (off_t)i * GRAN, GRAN);
    return 0;
}
CUresult cuMemMap(uint64_t va, size_t size, size_t offset, uint64_t h, unsigned long long flags) {
    int i = handle_index(h);
    if (!current) return 201;
    if (i < 0 || offset || flags || size != handles[i].size || va % GRAN || nmaps == MAXN) return 1;
    int inside = 0;
    for (int r = 0; r < nres; r++) inside |= res[r].size && va >= res[r].base && va + size <= res[r].base + res[r].size;
    if (!inside) return 1;
    for (int j = 0; j < nmaps; j++) if (maps[j].size && va < maps[j].va + maps[j].size && maps[j].va < va + size) return 208;
    if (stub_fail_map_after == 0) return 205;
    if (stub_fail_map_after > 0) stub_fail_map_after--;
    if (mmap((void *)va, size, PROT_NONE, MAP_SHARED | MAP_FIXED, memfd, (off_t)i * GRAN) == MAP_FAILED) return 2;
    maps[nmaps].va = va; maps[nmaps].size = size; maps[nmaps].h = h; maps[nmaps].access = 0; nmaps++;
    stub_calls[0]++; return 0;
}
CUresult cuMemSetAccess(uint64_t va, size_t size, const Access *d, size_t count) {
    if (!current) return 201;
    if (count != 1 || d->location.type != 1 || d->location.id != 0 || d->flags != 3 || !size || size % GRAN) return 1;
    stub_calls[1]++;
    if (stub_fail_access) return 2;
    for (uint64_t a = va; a < va + size; a += GRAN) {  /* every granule must be mapped */
        int found = 0;
        for (int j = 0; j < nmaps; j++) if (maps[j].size && a >= maps[j].va && a < maps[j].va + maps[j].size) found = 1;
        if (!found) return 1;
    }
    for (int j = 0; j < nmaps; j++) if (maps[j].size && maps[j].va >= va && maps[j].va < va + size) maps[j].access = 1;
    mprotect((void *)va, size, PROT_READ | PROT_WRITE);
    return 0;
}
CUresult cuMemUnmap(uint64_t va, size_t size) {
    if (!current) return 201;
    if (stub_fail_unmap_after == 0) return 999;  /* CUDA_ERROR_UNKNOWN */
    if (stub_fail_unmap_after > 0) stub_fail_unmap_after--;
    for (int j = 0; j < nmaps; j++) if (maps[j].size && maps[j].va == va) {
        if (maps[j].size != size) return 1;
        maps[j].size = 0; stub_calls[2]++; stub_last_sync_before_unmap = stub_calls[5];
        mmap((void *)va, size, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE | MAP_FIXED, -1, 0);
        return 0;
    }
    return 1;
}
"""
STUB_CDEF = """
    extern int stub_calls[16];
    extern int stub_fail_map_after, stub_fail_access, stub_fail_unmap_after;
    extern uint64_t stub_last_sync_before_unmap;
    void stub_set_limit(long pages);
    int stub_live_handles(void);
    int stub_live_mappings(void);
    int stub_accessible_mappings(void);
    int stub_live_reservations(void);
    int stub_ctx_refs(void);
"""
MAP, ACCESS, UNMAP, CREATE, RELEASE, SYNC = range(6)
GRAN = 2 << 20


@pytest.fixture(scope="module")
def stub_source(tmp_path_factory):
    import shutil
    import subprocess

    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler to build the stub driver")
    d = tmp_path_factory.mktemp("stubcuda")
    (d / "stub.c").write_text(STUB_C)
    subprocess.run([cc, "-shared", "-fPIC", "-O1", "-o", str(d / "libcuda-stub.so"), str(d / "stub.c")],
                   check=True, capture_output=True)
    return d / "libcuda-stub.so"


@pytest.fixture
def stub(stub_source, tmp_path, monkeypatch):
    """A fresh stub driver (a copy of the library has its own globals) installed as libcuda."""
    return _install_stub(stub_source, tmp_path / "libcuda.so.1", monkeypatch)


def _install_stub(stub_source, path, monkeypatch):
    import shutil

    from cffi import FFI

    from pyvattn.backends.cuda_vmm import CudaVmmBackend

    shutil.copy(stub_source, path)
    monkeypatch.setattr(cuda, "_lib", cuda.ffi.dlopen(str(path)))
    monkeypatch.setattr(cuda, "_init_status", None)
    monkeypatch.setattr(CudaVmmBackend, "_granularity", {})
    ffi = FFI()
    ffi.cdef(STUB_CDEF)
    return ffi.dlopen(str(path))


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


@pytest.mark.parametrize("failure", ["KeyboardInterrupt", "driver status"])
def test_stub_kvcache_books_equal_the_driver_after_a_failure_at_every_call(stub_source, tmp_path,
                                                                          monkeypatch, failure):
    """tests/test_exception_safety.py's sweep on cuda-vmm: the workload (growth, step_async,
    reclaim under a budget, reserve, trim, frees) with one driver call failing, at each index in
    turn; after each: the books against the stub driver's own state, and everything released at
    close. A fresh stub each run (the stub never reuses its table entries)."""
    from faults import sweep

    from pyvattn import KVCache
    from pyvattn.backends.cuda_vmm import CudaVmmBackend

    monkeypatch.setattr(CudaVmmBackend, "tensor", lambda self, base, n: device_tensor(base, n, torch.device("cpu")))
    state = {}

    def fresh(at):
        state["stub"] = _install_stub(stub_source, tmp_path / f"libcuda-{at}.so.1", monkeypatch)

    def make():  # 8 x 4096 fp32 = 128 KiB per token: 16 tokens per 2 MiB page, as the workload wants
        return KVCache(2, 8, 4096, max_batch_size=4, max_seq_len=256, dtype=torch.float32, device="cuda",
                       backend="cuda-vmm", memory_budget=48 * GRAN)

    def install(mp, cache, injector):
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
    assert sweep(make, install, error=KeyboardInterrupt(), fail=fail, data=False, reality=reality,
                 after_close=closed, before_each=fresh) > 50

"""The uvm64k backend: its driver conversation against a stub module (CI, no GPU), and real GPU
tests where the patched nvidia-uvm answers (marked ``uvm64k``, skipped with the probe's reason
elsewhere).

The stub (C, compiled at test time, below) includes the real ABI header, keeps the module's state
(handles with generations, KVC ranges, 64K mappings), validates input with the memo's NV_STATUS
codes, and backs pages with host memory so mapped VAs can be read from the CPU. Tests against it
check what the backend asks of the driver: batching to maxBatch, MAP vs MAP_SCATTER, 128/256 KiB
pages as 64K runs, all-or-nothing rollback, sync before unmap, UVM_FREE before munmap, fd choice.
They prove nothing about the real module: the GPU tests below and scripts/uvm_ioctl_test.py do.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from pyvattn import OutOfPages, backends
from pyvattn._ffi import cuda, libc
from pyvattn.errors import BackendUnavailable, OSCallError, UvmError

K64 = 64 << 10
MiB = 1 << 20
ROOT = Path(__file__).resolve().parents[1]

STUB_C = r"""
/* A strict stand-in for the pyvattn-patched nvidia-uvm module (and the few libcuda calls the
 * uvm64k backend makes), compiled at test time by tests/test_uvm_backend.py.
 *
 * It includes the real ABI header, keeps the state the module keeps (handles with generations,
 * KVC ranges, 64K mappings), validates input with the NV_STATUS codes of the design memo's table
 * (4.6), and backs "device" pages with host memory (a memfd), so a mapped VA can be read and
 * written from the CPU. What it checks is what the backend asks of the driver; it proves nothing
 * about the real module, which scripts/uvm_ioctl_test.py exercises on a GPU.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdint.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/uio.h>
#include <unistd.h>

#include "uvm_kvc_ioctl.h"

typedef struct {                 /* stock UVM_FREE (34), from uvm_ioctl.h */
    NvU64 base UVM_KVC_ALIGN8;
    NvU64 length UVM_KVC_ALIGN8;
    NV_STATUS rmStatus;
} STUB_UVM_FREE_PARAMS;

#define K64 65536ull
#define MAXH 65536
#define MAXR 256
#define MAXM 65536
#define OK UVM_KVC_STATUS_NV_OK
#define ST(x) UVM_KVC_STATUS_NV_ERR_##x

const NvU8 stub_uuid[16] = {0x5e, 0x1f, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13};
int stub_va_fd = 1001, stub_mm_fd = 1000;
int stub_stock;                       /* answer like a stock driver: -1/EINVAL */
NvU32 stub_abi_version = UVM_KVC_ABI_VERSION;
NvU64 stub_magic = UVM_KVC_MAGIC;
NvU32 stub_max_batch = 8;
NvU64 stub_page_sizes = UVM_KVC_SUPPORTED_PAGE_SIZES;
long stub_limit = 1 << 20;            /* 64K pages the "GPU" can hold */
NvU64 stub_quota_bytes;               /* what QUERY reports as the module parameter's cap */
int stub_foreign;                     /* answer as to a process that does not own the va_space */
int stub_eagain;                      /* the next N calls fail with EAGAIN (system suspending) */
int stub_calls[64];                   /* by request - 1536; [63] counts UVM_FREE */
int stub_fail_request = -1, stub_fail_after;   /* fail that request after N successes */
NV_STATUS stub_fail_status;
int stub_syncs, stub_syncs_at_last_unmap, stub_freed_unreserved;

static struct { NvU32 gen; int alive, maprefs, npages; long slot; } h[MAXH];   /* npages: 64K slots */
static struct { NvU64 base, len; } r[MAXR];
static struct { NvU64 va, handle, size; } m[MAXM];
static int nr, nm, memfd = -1, next_id = 1;
static long nslots, used, free_slots[MAXH], nfree;
static NvU32 gen_counter;

int stub_live_handles(void) { int n = 0; for (int i = 1; i < MAXH; i++) n += h[i].alive; return n; }
long stub_used_pages(void) { return used; }
int stub_live_maps(void) { int n = 0; for (int i = 0; i < nm; i++) n += m[i].va != 0; return n; }
int stub_live_ranges(void) { int n = 0; for (int i = 0; i < nr; i++) n += r[i].len != 0; return n; }
NvU64 stub_handle_at(NvU64 va) { for (int i = 0; i < nm; i++) if (m[i].va == va) return m[i].handle; return 0; }

/* copy_from_user / copy_to_user: fault on memory the process cannot read / write */
static int user_ok(NvU64 ptr, size_t n, int write) {
    static NvU8 scratch[1 << 20];
    struct iovec local = {scratch, n}, remote = {(void *)(uintptr_t)ptr, n};
    if (!ptr || n > sizeof(scratch)) return 0;
    if (process_vm_readv(getpid(), &local, 1, &remote, 1, 0) != (ssize_t)n) return 0;
    return !write || process_vm_writev(getpid(), &local, 1, &remote, 1, 0) == (ssize_t)n;
}

static int nonzero(const void *p, size_t n) { const NvU8 *b = p; while (n--) if (*b++) return 1; return 0; }
#define COMMON(p, allowed) do { \
    if ((p)->version != stub_abi_version) return ST(NOT_SUPPORTED); \
    if ((p)->flags & ~(NvU32)(allowed)) return ST(INVALID_FLAGS); \
    if (nonzero(&(p)->reserved, sizeof((p)->reserved)) || (p)->pad0) return ST(INVALID_ARGUMENT); \
} while (0)
#define GPU(p) do { if (memcmp((p)->gpuUuid.uuid, stub_uuid, 16)) return ST(INVALID_DEVICE); } while (0)
#define COUNT(n) do { if ((n) == 0) return ST(INVALID_ARGUMENT); if ((n) > stub_max_batch) return ST(INVALID_LIMIT); } while (0)

static int lookup(NvU64 handle) {
    NvU64 id = handle & 0xffffffffu;
    if (!id || id >= MAXH || !h[id].alive || h[id].gen != (NvU32)(handle >> 32)) return 0;
    return (int)id;
}

static int in_range(NvU64 base, NvU64 len) {
    if (!len || base % K64 || len % K64 || base + len < base) return 0;
    for (int i = 0; i < nr; i++)
        if (r[i].len && r[i].base <= base && base + len <= r[i].base + r[i].len) return 1;
    return 0;
}

static void put_slot(int id) {
    if (h[id].alive || h[id].maprefs || h[id].slot < 0) return;
    if (h[id].npages == 1) free_slots[nfree++] = h[id].slot;   /* bigger blocks are not reused */
    h[id].slot = -1;
    used -= h[id].npages;
}

static void unmap_index(int i) {
    int id = (int)(m[i].handle & 0xffffffffu);
    mmap((void *)m[i].va, m[i].size, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED | MAP_NORESERVE, -1, 0);
    m[i].va = 0;
    h[id].maprefs--;
    put_slot(id);
}

static int overlaps(int i, NvU64 base, NvU64 len) { return m[i].va && m[i].va < base + len && base < m[i].va + m[i].size; }

static int mapped_in(NvU64 base, NvU64 len) {
    for (int i = 0; i < nm; i++) if (overlaps(i, base, len)) return 1;
    return 0;
}

static void unmap_in(NvU64 base, NvU64 len) {   /* a page partly inside goes whole */
    for (int i = 0; i < nm; i++) if (overlaps(i, base, len)) unmap_index(i);
}

static NvU64 size_of(NvU64 handle) { return h[lookup(handle)].npages * K64; }

static NV_STATUS map_one(NvU64 va, NvU64 handle, int read_only) {
    int id = lookup(handle), i = 0;
    NvU64 size = h[id].npages * K64;
    unmap_in(va, size);
    while (i < nm && m[i].va) i++;
    if (i == nm) { if (nm == MAXM) return ST(NO_MEMORY); nm++; }
    if (mmap((void *)va, size, read_only ? PROT_READ : PROT_READ | PROT_WRITE, MAP_SHARED | MAP_FIXED,
             memfd, h[id].slot * (long)K64) == MAP_FAILED) return ST(INVALID_ADDRESS);
    m[i].va = va; m[i].handle = handle; m[i].size = size; h[id].maprefs++;
    return OK;
}

static NV_STATUS query(int fd, UVM_KVC_QUERY_PARAMS *p) {
    if (p->version != stub_abi_version) return ST(NOT_SUPPORTED);  /* no reserved field: outputs */
    if (p->flags) return ST(INVALID_FLAGS);
    if (p->pad0) return ST(INVALID_ARGUMENT);
    p->processLimitBytes = stub_quota_bytes;
    p->gpuLimitBytes = (NvU64)stub_limit * K64;
    p->maxMappingsPerPage = UVM_KVC_MAX_MAPPINGS_PER_PAGE;
    p->callerState = fd == stub_va_fd && !stub_foreign ? UVM_KVC_CALLER_OWNS_VA_SPACE : 0;
    p->fdBytes = fd == stub_va_fd && !memcmp(p->gpuUuid.uuid, stub_uuid, 16)  /* whole 2 MiB roots */
        ? (NvU64)((used * 65536 + (2 << 20) - 1) / (2 << 20)) * (2 << 20) : 0;
    p->processBytes = p->fdBytes;
    p->magic = stub_magic;
    p->supportedPageSizes = stub_page_sizes;
    p->maxBatch = stub_max_batch;
    p->fdType = fd == stub_va_fd ? UVM_KVC_FD_VA_SPACE : UVM_KVC_FD_MM;
    p->gpuState = fd == stub_va_fd && !memcmp(p->gpuUuid.uuid, stub_uuid, 16)
        ? UVM_KVC_GPU_REGISTERED | UVM_KVC_GPU_HAS_VA_SPACE | UVM_KVC_GPU_SUPPORTED : 0;
    return OK;
}

static NV_STATUS alloc(UVM_KVC_ALLOC_PARAMS *p) {
    COMMON(p, UVM_KVC_ALLOC_FLAGS_EVICT | UVM_KVC_ALLOC_FLAGS_ZERO);
    GPU(p);
    if ((p->pageSize != K64 && p->pageSize != 2 * K64 && p->pageSize != 4 * K64) || !(p->pageSize & stub_page_sizes))
        return ST(INVALID_ARGUMENT);
    int units = (int)(p->pageSize / K64);
    COUNT(p->count);
    if (!user_ok(p->handlesPtr, p->count * 8, 1)) return ST(INVALID_ADDRESS);
    if (used + (long)p->count * units > stub_limit) return ST(NO_MEMORY);
    if (memfd < 0) memfd = memfd_create("stub-uvm", MFD_CLOEXEC);
    NvU64 *out = (NvU64 *)(uintptr_t)p->handlesPtr;
    for (NvU64 k = 0; k < p->count; k++) {
        while (h[next_id].alive || h[next_id].maprefs) next_id = next_id % (MAXH - 1) + 1;
        int id = next_id;
        next_id = next_id % (MAXH - 1) + 1;
        long slot;
        if (units == 1 && nfree) {
            slot = free_slots[--nfree];
            if (p->flags & UVM_KVC_ALLOC_FLAGS_ZERO) {
                static NvU8 zeros[K64];
                pwrite(memfd, zeros, K64, slot * (long)K64);
            }
        } else {
            slot = nslots;
            nslots += units;
            ftruncate(memfd, nslots * (long)K64);   /* fresh memory reads as zeros */
        }
        h[id].alive = 1; h[id].gen = ++gen_counter; h[id].slot = slot; h[id].npages = units; used += units;
        out[k] = ((NvU64)h[id].gen << 32) | (NvU64)id;
    }
    p->countDone = p->count;
    return OK;
}

static NV_STATUS free_handles(UVM_KVC_FREE_PARAMS *p) {
    COMMON(p, UVM_KVC_FREE_FLAGS_FAIL_IF_MAPPED);
    COUNT(p->count);
    if (!user_ok(p->handlesPtr, p->count * 8, 0)) return ST(INVALID_ADDRESS);
    NvU64 *in = (NvU64 *)(uintptr_t)p->handlesPtr;
    for (NvU64 k = 0; k < p->count; k++) {
        int id = lookup(in[k]);
        if (!id) return ST(INVALID_OBJECT_HANDLE);
        for (NvU64 j = 0; j < k; j++) if (in[j] == in[k]) return ST(INVALID_ARGUMENT);
        if ((p->flags & UVM_KVC_FREE_FLAGS_FAIL_IF_MAPPED) && h[id].maprefs) return ST(IN_USE);
    }
    for (NvU64 k = 0; k < p->count; k++) {
        int id = lookup(in[k]);
        h[id].alive = 0;
        put_slot(id);
    }
    p->countDone = p->count;
    return OK;
}

static NV_STATUS create_range(UVM_KVC_CREATE_RANGE_PARAMS *p) {
    COMMON(p, 0);
    if (!p->length || p->base % (2 << 20) || p->length % (2 << 20) || p->base + p->length < p->base)
        return ST(INVALID_ADDRESS);   /* KVC ranges are whole 2 MiB blocks */
    for (int i = 0; i < nr; i++)
        if (r[i].len && p->base < r[i].base + r[i].len && r[i].base < p->base + p->length) return ST(UVM_ADDRESS_IN_USE);
    int i = 0;
    while (i < nr && r[i].len) i++;
    if (i == nr) { if (nr == MAXR) return ST(NO_MEMORY); nr++; }
    r[i].base = p->base; r[i].len = p->length;
    return OK;
}

static NV_STATUS map(UVM_KVC_MAP_PARAMS *p) {
    COMMON(p, UVM_KVC_MAP_FLAGS_NO_REPLACE | UVM_KVC_MAP_FLAGS_READ_ONLY);
    GPU(p);
    COUNT(p->count);
    if (p->base % K64) return ST(INVALID_ADDRESS);
    if (!user_ok(p->handlesPtr, p->count * 8, 0)) return ST(INVALID_ADDRESS);
    NvU64 *in = (NvU64 *)(uintptr_t)p->handlesPtr, total = 0;
    for (NvU64 k = 0; k < p->count; k++) {       /* handles back to back, each its own size */
        if (!lookup(in[k])) return ST(INVALID_OBJECT_HANDLE);
        total += size_of(in[k]);
    }
    if (!in_range(p->base, total)) return ST(INVALID_ADDRESS);
    if ((p->flags & UVM_KVC_MAP_FLAGS_NO_REPLACE) && mapped_in(p->base, total)) return ST(UVM_ADDRESS_IN_USE);
    for (NvU64 k = 0, va = p->base; k < p->count; va += size_of(in[k]), k++) {
        NV_STATUS s = map_one(va, in[k], p->flags & UVM_KVC_MAP_FLAGS_READ_ONLY);
        if (s != OK) { unmap_in(p->base, va - p->base); return s; }
    }
    p->countDone = p->count;
    return OK;
}

static NV_STATUS map_scatter(UVM_KVC_MAP_SCATTER_PARAMS *p) {
    COMMON(p, UVM_KVC_MAP_FLAGS_NO_REPLACE | UVM_KVC_MAP_FLAGS_READ_ONLY);
    GPU(p);
    COUNT(p->count);
    if (!user_ok(p->entriesPtr, p->count * sizeof(UVM_KVC_SCATTER_ENTRY), 0)) return ST(INVALID_ADDRESS);
    UVM_KVC_SCATTER_ENTRY *e = (UVM_KVC_SCATTER_ENTRY *)(uintptr_t)p->entriesPtr;
    for (NvU64 k = 0; k < p->count; k++) {
        if (e[k].va % K64) return ST(INVALID_ADDRESS);
        if (!lookup(e[k].handle)) return ST(INVALID_OBJECT_HANDLE);
        if (!in_range(e[k].va, size_of(e[k].handle))) return ST(INVALID_ADDRESS);
        if ((p->flags & UVM_KVC_MAP_FLAGS_NO_REPLACE) && mapped_in(e[k].va, size_of(e[k].handle)))
            return ST(UVM_ADDRESS_IN_USE);
    }
    for (NvU64 k = 0; k < p->count; k++) map_one(e[k].va, e[k].handle, p->flags & UVM_KVC_MAP_FLAGS_READ_ONLY);
    p->countDone = p->count;
    return OK;
}

static NV_STATUS unmap(UVM_KVC_UNMAP_PARAMS *p) {
    COMMON(p, 0);
    GPU(p);
    if (!in_range(p->base, p->length)) return ST(INVALID_ADDRESS);
    unmap_in(p->base, p->length);
    stub_syncs_at_last_unmap = stub_syncs;
    return OK;
}

static NV_STATUS uvm_free(STUB_UVM_FREE_PARAMS *p) {
    for (int i = 0; i < nr; i++) if (r[i].len && r[i].base == p->base && r[i].len == p->length) {
        unmap_in(r[i].base, r[i].len);
        /* the VA must still be reserved (mmapped) when UVM lets go of it: memo 4.9 */
        if (msync((void *)p->base, p->length, MS_ASYNC)) stub_freed_unreserved++;
        r[i].len = 0;
        return OK;
    }
    return ST(INVALID_ADDRESS);
}

int stub_ioctl(int fd, unsigned long request, void *arg) {
    NV_STATUS s;
    if (fd != stub_va_fd && fd != stub_mm_fd) { errno = ENOTTY; return -1; }
    if (stub_eagain > 0) { stub_eagain--; errno = EAGAIN; return -1; }
    if (request == 34) { stub_calls[63]++; s = uvm_free(arg); ((STUB_UVM_FREE_PARAMS *)arg)->rmStatus = s; return 0; }
    if (stub_stock || request < UVM_KVC_QUERY || request > UVM_KVC_UNMAP) { errno = EINVAL; return -1; }
    stub_calls[request - 1536]++;
    NV_STATUS *status;
    switch (request) {
    case UVM_KVC_QUERY: status = &((UVM_KVC_QUERY_PARAMS *)arg)->rmStatus; break;
    case UVM_KVC_ALLOC: status = &((UVM_KVC_ALLOC_PARAMS *)arg)->rmStatus; break;
    case UVM_KVC_FREE: status = &((UVM_KVC_FREE_PARAMS *)arg)->rmStatus; break;
    case UVM_KVC_CREATE_RANGE: status = &((UVM_KVC_CREATE_RANGE_PARAMS *)arg)->rmStatus; break;
    case UVM_KVC_MAP: status = &((UVM_KVC_MAP_PARAMS *)arg)->rmStatus; break;
    case UVM_KVC_MAP_SCATTER: status = &((UVM_KVC_MAP_SCATTER_PARAMS *)arg)->rmStatus; break;
    default: status = &((UVM_KVC_UNMAP_PARAMS *)arg)->rmStatus; break;
    }
    if ((int)request == stub_fail_request && stub_fail_after-- == 0) { *status = stub_fail_status; return 0; }
    if (request != UVM_KVC_QUERY && (fd != stub_va_fd || stub_foreign)) { *status = ST(ILLEGAL_ACTION); return 0; }
    switch (request) {
    case UVM_KVC_QUERY: s = query(fd, arg); break;
    case UVM_KVC_ALLOC: s = alloc(arg); break;
    case UVM_KVC_FREE: s = free_handles(arg); break;
    case UVM_KVC_CREATE_RANGE: s = create_range(arg); break;
    case UVM_KVC_MAP: s = map(arg); break;
    case UVM_KVC_MAP_SCATTER: s = map_scatter(arg); break;
    default: s = unmap(arg); break;
    }
    *status = s;
    return 0;                         /* like UVM's routing: the status is in the struct */
}

/* --- libcuda: the calls the backend makes ---------------------------------------------------- */
typedef int CUresult;
static int ctx_obj, ctx_refs, initialized;
static __thread void *current;
int stub_ctx_refs(void) { return ctx_refs; }
CUresult cuInit(unsigned flags) { initialized = !flags; return flags ? 1 : 0; }
CUresult cuDriverGetVersion(int *v) { *v = 12040; return 0; }
CUresult cuGetErrorName(CUresult e, const char **s) { *s = e == 201 ? "CUDA_ERROR_INVALID_CONTEXT" : 0; return !*s; }
CUresult cuGetErrorString(CUresult e, const char **s) { *s = "stub driver error"; return 0; }
CUresult cuDeviceGetCount(int *n) { if (!initialized) return 3; *n = 1; return 0; }
CUresult cuDeviceGet(int *d, int ord) { if (!initialized) return 3; if (ord) return 101; *d = 0; return 0; }
CUresult cuDeviceGetName(char *name, int len, int dev) { strncpy(name, "Stub GPU", len); return 0; }
CUresult cuDeviceGetUuid(void *u, int dev) { memcpy(u, stub_uuid, 16); return 0; }
CUresult cuDeviceGetUuid_v2(void *u, int dev) { memcpy(u, stub_uuid, 16); return 0; }
CUresult cuDevicePrimaryCtxRetain(void **ctx, int dev) { *ctx = &ctx_obj; ctx_refs++; return 0; }
CUresult cuDevicePrimaryCtxRelease_v2(int dev) { if (ctx_refs <= 0) return 201; ctx_refs--; return 0; }
CUresult cuCtxGetCurrent(void **ctx) { if (!initialized) return 3; *ctx = current; return 0; }
CUresult cuCtxSetCurrent(void *ctx) { current = ctx; return 0; }
CUresult cuCtxSynchronize(void) { if (!current) return 201; stub_syncs++; return 0; }
CUresult cuMemGetInfo_v2(size_t *free, size_t *total) {
    if (!current) return 201;
    *total = (size_t)stub_limit * K64; *free = (size_t)(stub_limit - used) * K64; return 0;
}
"""
STUB_CDEF = """
    extern int stub_va_fd, stub_mm_fd, stub_stock;
    extern uint32_t stub_abi_version, stub_max_batch;
    extern uint64_t stub_magic, stub_page_sizes;
    extern long stub_limit;
    extern int stub_calls[64];
    extern int stub_foreign, stub_eagain;
    extern int stub_fail_request, stub_fail_after;
    extern uint32_t stub_fail_status;
    extern int stub_syncs, stub_syncs_at_last_unmap, stub_freed_unreserved;
    int stub_live_handles(void);
    long stub_used_pages(void);
    extern uint64_t stub_quota_bytes;
    int stub_live_maps(void);
    int stub_live_ranges(void);
    uint64_t stub_handle_at(uint64_t va);
    int stub_ctx_refs(void);
    int stub_ioctl(int fd, unsigned long request, void *arg);
"""
QUERY, ALLOC, FREE, CREATE_RANGE, MAP, SCATTER, UNMAP = range(7)
UVM_FREE = 63  # stub_calls index of the stock UVM_FREE


@pytest.fixture(scope="module")
def stub_source(tmp_path_factory):
    from pyvattn._ffi import uvm

    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler to build the stub module")
    d = tmp_path_factory.mktemp("stubuvm")
    (d / "stub.c").write_text(STUB_C)
    subprocess.run([cc, "-shared", "-fPIC", "-O1", "-Wall", "-Werror", "-Wno-unused-result",
                    "-I", str(uvm.HEADER.parent), "-o", str(d / "libuvm-stub.so"), str(d / "stub.c")],
                   check=True, capture_output=True, text=True)
    return d / "libuvm-stub.so"


@pytest.fixture
def stub(stub_source, tmp_path, monkeypatch):
    """A fresh stub (own copy of the library, own globals) standing in for libcuda and for the
    ioctl syscall; /proc/self/fd scanning sees the stub's mm fd and va_space fd."""
    from cffi import FFI

    from pyvattn._ffi import uvm
    from pyvattn.backends import uvm as uvm_backend

    path = tmp_path / "libuvm-stub.so"
    shutil.copy(stub_source, path)
    ffi = FFI()
    ffi.cdef(STUB_CDEF)
    lib = ffi.dlopen(str(path))
    monkeypatch.setattr(cuda, "_lib", cuda.ffi.dlopen(str(path)))
    monkeypatch.setattr(cuda, "_init_status", None)
    monkeypatch.setattr(uvm, "_libc", types.SimpleNamespace(ioctl=lib.stub_ioctl))
    monkeypatch.setattr(uvm_backend, "uvm_fds", lambda: [lib.stub_mm_fd, lib.stub_va_fd])
    return lib


def _backend(page_size=K64):
    from pyvattn.backends.uvm import UvmBackend

    return UvmBackend(torch.device("cuda"), page_size)


def _fill(va: int, nbytes: int, value: int) -> None:
    np.frombuffer(libc.buffer(va, nbytes), dtype=np.uint8)[:] = value


def _read(va: int, nbytes: int) -> np.ndarray:
    return np.frombuffer(libc.buffer(va, nbytes), dtype=np.uint8).copy()


# --- probe ---------------------------------------------------------------------------------------
def test_stub_probe_answers_and_explains(stub, monkeypatch):
    from pyvattn.backends import uvm as uvm_backend
    from pyvattn.backends.uvm import UvmBackend

    p = UvmBackend.probe(torch.device("cuda"))
    assert p.available and f"fd {stub.stub_va_fd}" in p.reason and "8 per ioctl" in p.reason
    assert "per-process cap none" in p.reason and "all processes" in p.reason
    stub.stub_quota_bytes = 3 << 30
    assert "per-process cap 3072 MiB" in UvmBackend.probe(torch.device("cuda")).reason
    stub.stub_quota_bytes = 0
    assert backends.probe("uvm64k", torch.device("cuda")).available
    assert "CUDA devices only" in UvmBackend.probe(torch.device("cpu")).reason
    assert "no CUDA device 3" in UvmBackend.probe(torch.device("cuda:3")).reason
    stub.stub_stock = 1
    p = UvmBackend.probe(torch.device("cuda"))
    assert not p.available and "stock driver" in p.reason and "EINVAL" in p.reason
    stub.stub_stock = 0
    stub.stub_abi_version = 99
    p = UvmBackend.probe(torch.device("cuda"))
    assert not p.available and "ABI version" in p.reason
    stub.stub_abi_version = 2  # UVM_KVC_ABI_VERSION
    stub.stub_magic = 0x1234
    p = UvmBackend.probe(torch.device("cuda"))
    assert not p.available and "magic" in p.reason
    stub.stub_magic = int.from_bytes(b"UVMKVC01", "little")
    monkeypatch.setattr(uvm_backend, "uvm_fds", lambda: [])
    p = UvmBackend.probe(torch.device("cuda"))
    assert not p.available and "no /dev/nvidia-uvm descriptor" in p.reason
    assert stub.stub_ctx_refs() == 0  # the probe's context check left no reference behind


def test_stub_uses_the_va_space_fd_never_the_mm_fd(stub, monkeypatch):
    from pyvattn.backends import uvm as uvm_backend

    b = _backend()
    assert b.fd == stub.stub_va_fd and stub.stub_ctx_refs() == 1
    info = b.describe()
    assert info["backend"] == "uvm64k" and info["max_batch"] == 8 and info["granularity"] == K64
    assert info["page_sizes"] == [K64, 2 * K64, 4 * K64] and info["abi_version"] == 2
    b.close()
    assert stub.stub_ctx_refs() == 0
    monkeypatch.setattr(uvm_backend, "uvm_fds", lambda: [stub.stub_mm_fd])
    with pytest.raises(BackendUnavailable, match="not a va_space fd"):
        _backend()
    assert stub.stub_ctx_refs() == 0


# --- ranges and pages ----------------------------------------------------------------------------
def test_stub_bytes_held_comes_from_query(stub):
    b = _backend()
    assert b.bytes_held() == 0 and b.describe()["process_limit_bytes"] == 0
    pages = b.create_pages(33)  # 33 x 64 KiB: two 2 MiB roots
    assert b.bytes_held() == 4 << 20
    b.release_pages(pages)
    assert b.bytes_held() == 0
    b.close()


def test_stub_reserve_is_2mib_aligned_and_unreserve_frees_the_range_before_munmap(stub):
    b = _backend()
    base = b.reserve(3 * K64)
    assert base % (2 * MiB) == 0 and stub.stub_calls[CREATE_RANGE] == 1 and stub.stub_live_ranges() == 1
    with pytest.raises(ValueError, match="nbytes"):
        b.reserve(K64 + 1)
    with pytest.raises(ValueError, match="not a live reservation"):
        b.unreserve(base, 2 * K64)
    b.unreserve(base, 3 * K64)
    assert stub.stub_calls[UVM_FREE] == 1 and stub.stub_live_ranges() == 0
    assert stub.stub_freed_unreserved == 0  # UVM let go while the VA was still reserved
    b.close()


def test_stub_bigger_pages_are_one_module_handle_where_the_module_has_that_size(stub):
    b = _backend(4 * K64)
    assert b.describe()["handles_per_page"] == 1
    assert b.describe()["supported_page_sizes"] == [K64, 2 * K64, 4 * K64]
    pages = b.create_pages(10)  # 10 handles of 256K: 8 + 2
    assert stub.stub_calls[ALLOC] == 2 and stub.stub_live_handles() == 10 and stub.stub_used_pages() == 40
    b.close()
    stub.stub_page_sizes = K64  # a module with 64K pages only
    b = _backend(4 * K64)
    assert b.describe()["handles_per_page"] == 4
    pages = b.create_pages(2)
    assert stub.stub_live_handles() == 8 and len(pages) == 2
    b.close()


def test_stub_create_pages_batches_to_max_batch_and_is_all_or_nothing(stub):
    stub.stub_page_sizes = K64
    b = _backend(2 * K64)  # two 64K handles per page
    pages = b.create_pages(10)  # 20 handles: 8 + 8 + 4
    assert len(set(pages)) == 10 and stub.stub_calls[ALLOC] == 3 and stub.stub_live_handles() == 20
    stub.stub_limit = 29
    with pytest.raises(OutOfPages) as info:
        b.create_pages(5)  # 10 handles: 8 fit, the batch of 2 after them does not
    assert info.value.needed == 5 and "NV_ERR_NO_MEMORY" in str(info.value)
    assert stub.stub_live_handles() == 20  # the first batch was given back
    b.release_pages(pages[:3])
    assert stub.stub_live_handles() == 14 and stub.stub_calls[FREE] == 1 + 1  # rollback + release
    with pytest.raises(ValueError, match="not live"):
        b.release_pages(pages[:1])
    b.close()
    assert stub.stub_live_handles() == 0


# --- mapping -------------------------------------------------------------------------------------
@pytest.mark.parametrize("native", [True, False], ids=["native", "64k-parts"])
@pytest.mark.parametrize("page_size", [K64, 2 * K64, 4 * K64])
def test_stub_map_puts_each_page_at_its_va_and_data_moves_with_the_page(stub, page_size, native):
    if not native:
        stub.stub_page_sizes = K64
    b = _backend(page_size)
    P = page_size
    base = b.reserve(32 * P)
    pages = b.create_pages(6)
    slots = [0, 1, 2, 9, 20, 21]
    b.map([base + s * P for s in slots], pages)
    for i, s in enumerate(slots):
        _fill(base + s * P, P, 10 + i)
    b.unmap([base + s * P for s in slots])
    assert stub.stub_live_maps() == 0 and stub.stub_syncs_at_last_unmap >= 1
    moved = [30, 31, 25, 3, 4, 5]
    b.map([base + s * P for s in moved], pages[::-1])  # scattered: MAP_SCATTER
    for i, s in enumerate(moved):
        assert (_read(base + s * P, P) == 10 + (5 - i)).all()
    b.unmap([base + s * P for s in moved])
    calls = stub.stub_calls[MAP]
    b.map([base + (10 + i) * P for i in range(6)], pages)  # one run: MAPs of maxBatch handles
    assert stub.stub_calls[MAP] == calls + -(-6 * b.describe()["handles_per_page"] // 8)
    for i in range(6):
        assert (_read(base + (10 + i) * P, P) == 10 + i).all()
    b.close()
    assert (stub.stub_live_maps(), stub.stub_live_handles(), stub.stub_live_ranges()) == (0, 0, 0)


def test_stub_contiguous_runs_use_map_and_scattered_pages_use_map_scatter(stub):
    b = _backend()
    base = b.reserve(64 * K64)
    pages = b.create_pages(16)
    b.map([base + i * K64 for i in range(16)], pages)  # one run of 16: two MAPs of 8
    assert (stub.stub_calls[MAP], stub.stub_calls[SCATTER]) == (2, 0)
    b.unmap([base + i * K64 for i in range(16)])
    assert stub.stub_calls[UNMAP] == 1  # one run, one UNMAP
    b.map([base + 2 * i * K64 for i in range(16)], pages)  # 16 runs of 1: two SCATTERs of 8
    assert (stub.stub_calls[MAP], stub.stub_calls[SCATTER]) == (2, 2)
    for i, h in enumerate(pages):
        assert stub.stub_handle_at(base + 2 * i * K64) == h
    b.unmap([base + 2 * i * K64 for i in range(16)])
    assert stub.stub_calls[UNMAP] == 1 + 16
    b.close()


def test_stub_map_checks_input_before_any_ioctl(stub):
    b = _backend()
    base = b.reserve(4 * K64)
    pages = b.create_pages(2)
    before = dict(enumerate(stub.stub_calls))
    with pytest.raises(ValueError, match="inside a reservation"):
        b.map([base + 4 * K64], pages[:1])
    with pytest.raises(ValueError, match="page-aligned"):
        b.map([base + 4096], pages[:1])
    with pytest.raises(ValueError, match="not live"):
        b.map([base], [12345])
    with pytest.raises(ValueError, match="duplicates"):
        b.map([base, base], pages)
    b.map([base], pages[:1])
    with pytest.raises(ValueError, match="already mapped"):
        b.map([base], pages[1:])
    with pytest.raises(ValueError, match="already mapped"):
        b.map([base + K64], pages[:1])  # a second mapping of a page is asked for with share=True
    with pytest.raises(ValueError, match="not mapped"):
        b.unmap([base + K64])
    with pytest.raises(ValueError, match="still has mapped pages"):
        b.unreserve(base, 4 * K64)
    assert stub.stub_calls[MAP] == before[MAP] + 1
    b.close()


@pytest.mark.parametrize("status,error", [("NV_ERR_NO_MEMORY", OutOfPages),
                                          ("NV_ERR_INVALID_ADDRESS", UvmError)])
def test_stub_map_failure_rolls_back_every_earlier_batch(stub, status, error):
    from pyvattn._ffi import uvm

    b = _backend()
    base = b.reserve(32 * K64)
    pages = b.create_pages(20)
    stub.stub_fail_request, stub.stub_fail_after = uvm.UVM_KVC_MAP, 2  # the third MAP fails
    stub.stub_fail_status = uvm.STATUS[status]
    with pytest.raises(error) as info:
        b.map([base + i * K64 for i in range(20)], pages)
    assert status in str(info.value)
    assert stub.stub_live_maps() == 0  # the two batches that succeeded were unmapped
    stub.stub_fail_request = -1
    b.map([base + i * K64 for i in range(20)], pages)  # the backend's books are consistent
    assert stub.stub_live_maps() == 20
    b.close()


def test_stub_unmap_failure_part_way_keeps_exact_books(stub):
    """Three separate runs; the second UNMAP fails: the first run is unmapped for good (and the
    error says so), the rest stays mapped, and everything can still be unmapped and closed."""
    from pyvattn._ffi import uvm

    b = _backend()
    base = b.reserve(16 * K64)
    pages = b.create_pages(6)
    vas = [base + i * K64 for i in (0, 1, 4, 5, 8, 9)]  # runs at 0, 4 and 8
    b.map(vas, pages)
    stub.stub_fail_request, stub.stub_fail_after = uvm.UVM_KVC_UNMAP, 1
    stub.stub_fail_status = uvm.STATUS["NV_ERR_INVALID_ARGUMENT"]
    with pytest.raises(UvmError) as info:
        b.unmap(vas)
    stub.stub_fail_request = -1
    assert sorted(info.value.unmapped_vas) == vas[:2]
    assert stub.stub_live_maps() == 4
    with pytest.raises(ValueError, match="not mapped"):
        b.unmap(vas[:1])  # the backend knows these are gone
    b.unmap(vas[2:])
    b.release_pages(pages)
    b.close()
    assert (stub.stub_live_maps(), stub.stub_live_handles()) == (0, 0)


def test_stub_failed_rollback_does_not_hide_the_first_error(stub):
    """A MAP fails, and undoing the batches mapped before it fails too: the caller still gets the
    MAP's error, with the clean-up failure noted on it."""
    from pyvattn._ffi import uvm

    b = _backend()
    base = b.reserve(32 * K64)
    pages = b.create_pages(20)
    stub.stub_fail_request, stub.stub_fail_after = uvm.UVM_KVC_MAP, 2
    stub.stub_fail_status = uvm.STATUS["NV_ERR_INVALID_ADDRESS"]

    def broken_unmap(ranges, on_done=None):
        raise UvmError("UVM_KVC_UNMAP", "NV_ERR_INVALID_STATE", 0x40)

    b._unmap_ranges = broken_unmap  # instance attribute over the method, removed below
    with pytest.raises(UvmError) as info:
        b.map([base + i * K64 for i in range(20)], pages)
    stub.stub_fail_request = -1
    assert info.value.status == "NV_ERR_INVALID_ADDRESS"
    assert info.value.cleanup_error.status == "NV_ERR_INVALID_STATE"
    del b._unmap_ranges
    b.close()


def test_stub_unmap_synchronizes_before_the_ioctl(stub):
    b = _backend()
    base = b.reserve(4 * K64)
    b.map([base], b.create_pages(1))
    syncs = stub.stub_syncs
    b.unmap([base])
    assert stub.stub_syncs == syncs + 1 and stub.stub_syncs_at_last_unmap == syncs + 1
    b.close()


def test_stub_map_and_unmap_from_a_thread_with_no_current_context(stub):
    """step_async maps on a background thread, which has no CUDA context current."""
    import threading

    b = _backend()
    base = b.reserve(8 * K64)
    pages = b.create_pages(4)
    errors = []

    def work():
        try:
            b.map([base + i * K64 for i in range(4)], pages)
            _fill(base, 4 * K64, 9)
            b.unmap([base + i * K64 for i in range(4)])  # its sync needs the context current
        except Exception as exc:  # reported below
            errors.append(exc)

    t = threading.Thread(target=work)
    t.start()
    t.join()
    assert not errors and stub.stub_live_maps() == 0 and stub.stub_syncs_at_last_unmap >= 1
    b.close()


def test_stub_close_frees_everything_and_is_idempotent(stub):
    b = _backend(4 * K64)
    base = b.reserve(8 * 4 * K64)
    pages = b.create_pages(5)
    b.map([base + i * 4 * K64 for i in range(3)], pages[:3])
    b.close()
    assert (stub.stub_live_maps(), stub.stub_live_handles(), stub.stub_live_ranges(), stub.stub_ctx_refs()) \
        == (0, 0, 0, 0)
    assert stub.stub_freed_unreserved == 0
    b.close()
    with pytest.raises(RuntimeError, match="closed"):
        b.reserve(4 * K64)


def test_stub_reserve_rounds_the_range_to_whole_2mib_blocks(stub):
    """The module's ranges are whole 2 MiB blocks: a 3-page reservation is a 2 MiB range, and
    pages map only inside what was asked for."""
    b = _backend()
    base = b.reserve(3 * K64)
    pages = b.create_pages(3)
    b.map([base + i * K64 for i in range(3)], pages)
    with pytest.raises(ValueError, match="inside a reservation"):
        b.map([base + 3 * K64], b.create_pages(1))
    b.unmap([base + i * K64 for i in range(3)])
    b.unreserve(base, 3 * K64)
    assert stub.stub_live_ranges() == 0 and stub.stub_freed_unreserved == 0
    b.close()


def _in_forked_child(fn) -> dict:
    """Run fn() in a forked child; return the dict it returns (through a pipe)."""
    import json
    import os

    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: no pytest machinery, no destructors
        os.close(r)
        try:
            out = fn()
        except BaseException as exc:  # reported to the parent
            out = {"error": repr(exc)}
        os.write(w, json.dumps(out).encode())
        os._exit(0)
    os.close(w)
    data = b""
    while chunk := os.read(r, 65536):
        data += chunk
    os.close(r)
    os.waitpid(pid, 0)
    return json.loads(data)


def test_stub_forked_child_close_touches_nothing_of_the_parent(stub):
    """M3: CUDA's UVM fd is inherited across fork. A child that collects a cache must issue no
    ioctl and no CUDA call: the ranges, pages and mappings stay the parent's."""
    b = _backend()
    base = b.reserve(8 * K64)
    pages = b.create_pages(4)
    b.map([base + i * K64 for i in range(4)], pages)
    _fill(base, 4 * K64, 7)

    def child():
        before = list(stub.stub_calls)
        refs = stub.stub_ctx_refs()
        b.close()  # what KVCache.__del__ in a child ends up doing
        errors = []
        for call in (lambda: b.create_pages(1), lambda: b.map([base], pages[:1]), lambda: b.unmap([base])):
            try:
                call()
            except (RuntimeError, ValueError) as exc:  # closed, or its books are gone
                errors.append(str(exc))
        return {"calls": [a - c for a, c in zip(stub.stub_calls, before)],
                "ctx_refs": stub.stub_ctx_refs() - refs, "closed": b._closed, "errors": errors}

    out = _in_forked_child(child)
    assert out.get("error") is None, out
    assert not any(out["calls"]) and out["ctx_refs"] == 0 and out["closed"], out
    assert len(out["errors"]) == 3  # closed in the child: nothing more is attempted

    def child_uses():
        try:
            b.create_pages(1)
        except RuntimeError as exc:
            return {"raised": str(exc), "calls": stub.stub_calls[ALLOC]}
        return {"raised": None}

    calls = stub.stub_calls[ALLOC]
    out = _in_forked_child(child_uses)
    assert "forked child" in (out["raised"] or "") and out["calls"] == calls, out
    # The parent is untouched: its pages are still mapped and hold their data.
    assert (stub.stub_live_maps(), stub.stub_live_handles(), stub.stub_live_ranges()) == (4, 4, 1)
    assert (_read(base, 4 * K64) == 7).all()
    b.close()
    assert (stub.stub_live_maps(), stub.stub_live_handles(), stub.stub_live_ranges()) == (0, 0, 0)


def test_stub_fd_of_another_process_is_not_used(stub):
    """An fd the module says the caller does not own (inherited across fork) is skipped with that
    reason; the backend does not start on it."""
    stub.stub_foreign = 1
    with pytest.raises(BackendUnavailable, match="another process"):
        _backend()
    stub.stub_foreign = 0
    assert stub.stub_ctx_refs() == 0


def test_stub_eagain_is_retried(stub):
    """UVM answers EAGAIN while the system suspends (before doing anything): the call is retried
    and succeeds, and a call that keeps getting EAGAIN fails with it after the retry window."""
    from pyvattn._ffi import uvm

    b = _backend()
    stub.stub_eagain = 5
    pages = b.create_pages(2)
    assert len(pages) == 2 and stub.stub_eagain == 0 and stub.stub_live_handles() == 2
    old = uvm.EAGAIN_RETRY_SECONDS
    uvm.EAGAIN_RETRY_SECONDS = 0.05
    try:
        stub.stub_eagain = 1 << 30
        with pytest.raises(OSCallError) as info:
            b.create_pages(1)
        assert info.value.status == "EAGAIN"
    finally:
        uvm.EAGAIN_RETRY_SECONDS = old
        stub.stub_eagain = 0
    assert stub.stub_live_handles() == 2
    b.close()


def test_stub_kvcache_workload_through_the_uvm64k_backend(stub, monkeypatch):
    """KVCache on backend="uvm64k" over the stub, whose pages are host memory: growth, reclaim
    under a budget, OutOfPages and close, with every value checked. Views are made on the CPU
    (the same DLPack helper) since this torch has no CUDA; the rest is the backend's own code."""
    from kvdata import check, write
    from pyvattn import KVCache
    from pyvattn._ffi.dlpack import device_tensor
    from pyvattn.backends.uvm import UvmBackend

    monkeypatch.setattr(UvmBackend, "tensor", lambda self, base, n: device_tensor(base, n, torch.device("cpu")))
    # 2 heads x 32 x fp32 = 256 B per token: 256 tokens per 64 KiB page
    cache = KVCache(2, 2, 32, max_batch_size=4, max_seq_len=2000, dtype=torch.float32, device="cuda",
                    backend="auto", memory_budget=40 * K64)
    assert cache.selection.name == "uvm64k" and cache.page_size == K64
    a, b = cache.alloc_slot(), cache.alloc_slot()
    cache.step({a: 1000, b: 100})
    write(cache, a, 1, 0, 1000)
    write(cache, b, 2, 0, 100)
    cache.step({a: 1500, b: 700})
    write(cache, a, 1, 1000, 1500)
    write(cache, b, 2, 100, 700)
    check(cache, a, 1, 1500)
    check(cache, b, 2, 700)
    d = cache.alloc_slot()
    with pytest.raises(OutOfPages):
        cache.step({d: 2000, b: 2000})
    check(cache, a, 1, 1500)
    cache.free_slot(a)
    cache.step({d: 1200})  # reclaims a's pages: unmap after a sync, remap under d
    write(cache, d, 4, 0, 1200)
    check(cache, d, 4, 1200)
    check(cache, b, 2, 700)
    assert stub.stub_calls[SCATTER] + stub.stub_calls[MAP] > 0 and stub.stub_calls[UNMAP] > 0
    cache.close()
    assert (stub.stub_live_maps(), stub.stub_live_handles(), stub.stub_live_ranges(), stub.stub_ctx_refs()) \
        == (0, 0, 0, 0)


# --- exception safety: a failure at every ioctl of a KVCache workload -----------------------------
@pytest.mark.parametrize("workload", ["plain", "fork"])
@pytest.mark.parametrize("failure", ["KeyboardInterrupt", "ENOMEM"])
def test_stub_kvcache_books_equal_the_module_after_a_failure_at_every_ioctl(stub, monkeypatch, failure, workload):
    """tests/test_exception_safety.py's sweep on uvm64k: the workload (with ``fork``: prefix
    sharing, one module handle mapped at two VAs, which the module's per-page PTE counts allow)
    with one ioctl failing, at each index in turn; after each: the books against the stub module's
    own mappings (the handle at every VA) and handles, and everything released at close."""
    import errno

    from faults import ForkWorkload, Workload, sweep
    from pyvattn import KVCache
    from pyvattn._ffi import uvm
    from pyvattn._ffi.dlpack import device_tensor
    from pyvattn.backends.uvm import UvmBackend

    monkeypatch.setattr(UvmBackend, "tensor", lambda self, base, n: device_tensor(base, n, torch.device("cpu")))

    def make():  # 1 x 1024 fp32 = 4 KiB per token: 16 tokens per 64 KiB page, as the workload wants
        return KVCache(2, 1, 1024, max_batch_size=4, max_seq_len=256, dtype=torch.float32, device="cuda",
                       backend="uvm64k", memory_budget=(64 if workload == "fork" else 48) * K64)

    def install(mp, cache, injector):
        mp.setattr(uvm, "_libc", types.SimpleNamespace(ioctl=injector.wrap("ioctl", uvm._libc.ioctl)))

    def enomem(name, fn, args):
        uvm.ffi.errno = errno.ENOMEM
        return -1

    def reality(cache):
        books = cache.backend.books()
        assert stub.stub_live_maps() == len(books["mapped"]) and stub.stub_live_handles() == len(books["live"])
        for va, handle in books["mapped"].items():
            assert stub.stub_handle_at(va) == handle

    def closed(backend):
        assert (stub.stub_live_maps(), stub.stub_live_handles(), stub.stub_live_ranges(),
                stub.stub_ctx_refs()) == (0, 0, 0, 0)

    assert sweep(make, install, error=KeyboardInterrupt(), fail=enomem if failure == "ENOMEM" else None,
                 data=False, reality=reality, after_close=closed,
                 workload=ForkWorkload if workload == "fork" else Workload) > 20


# --- on a GPU with the patched module -------------------------------------------------------------
def _skip_reason() -> str | None:
    if not torch.cuda.is_available():
        return "no CUDA device visible to torch"
    p = backends.probe("uvm64k", torch.device("cuda"))
    return None if p.available else f"uvm64k unavailable: {p.reason}"


@pytest.fixture(params=[K64, 2 * K64, 4 * K64], ids=["64K", "128K", "256K"])
def gpu_backend(request):
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    from pyvattn.backends.uvm import UvmBackend

    torch.cuda.init()
    b = UvmBackend(torch.device("cuda"), request.param)
    yield b
    b.close()


@pytest.mark.gpu
@pytest.mark.uvm64k
def test_gpu_fresh_pages_are_zero_and_data_survives_remap(gpu_backend):
    b, P = gpu_backend, gpu_backend.page_size
    base = b.reserve(16 * P)
    pages = b.create_pages(8)
    b.map([base + i * P for i in range(8)], pages)
    v = b.tensor(base, 8 * P).view(torch.int32)
    assert v.device.type == "cuda" and int(v.count_nonzero()) == 0
    v.copy_(torch.arange(v.numel(), dtype=torch.int32, device=v.device))
    b.unmap([base + i * P for i in range(8)])
    b.map([base + (15 - i) * P for i in range(8)], pages)  # scattered, reversed
    for i in range(8):
        page = b.tensor(base + (15 - i) * P, P).view(torch.int32)
        want = torch.arange(i * P // 4, (i + 1) * P // 4, dtype=torch.int32, device=page.device)
        assert torch.equal(page, want)
    del v, page
    b.unmap([base + (15 - i) * P for i in range(8)])
    b.release_pages(pages)
    b.unreserve(base, 16 * P)


@pytest.mark.gpu
@pytest.mark.uvm64k
def test_gpu_unmap_waits_for_kernels_still_reading(gpu_backend):
    b, P = gpu_backend, gpu_backend.page_size
    base = b.reserve(2 * P)
    (h,) = b.create_pages(1)
    b.map([base], [h])
    page = b.tensor(base, P).view(torch.float32)
    page.fill_(3.0)
    torch.cuda._sleep(200_000_000)  # keep the stream busy (~0.1 s), then read the page
    total = page.sum()
    b.unmap([base])  # must not pull the page from under the queued read (a fatal fault)
    torch.cuda.synchronize()
    assert total.item() == 3.0 * page.numel()
    del page
    b.release_pages([h])
    b.unreserve(base, 2 * P)


@pytest.mark.gpu
@pytest.mark.uvm64k
def test_gpu_kvcache_uses_uvm64k_by_default():
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    from kvdata import check, write
    from pyvattn import KVCache

    with KVCache(2, 2, 128, max_batch_size=3, max_seq_len=4000, dtype=torch.float16, device="cuda") as cache:
        assert cache.selection.name == "uvm64k" and cache.page_size == K64
        s = cache.alloc_slot()
        cache.step({s: 3000})
        write(cache, s, 1, 0, 3000)
        check(cache, s, 1, 3000)


@pytest.mark.gpu
@pytest.mark.uvm64k
def test_gpu_close_returns_device_memory(gpu_backend):
    b = gpu_backend
    free0, _ = b.mem_info()
    n = 256 * MiB // b.page_size
    base = b.reserve(n * b.page_size)
    b.map([base + i * b.page_size for i in range(n)], b.create_pages(n))
    assert b.mem_info()[0] <= free0 - 256 * MiB
    b.close()
    torch.cuda.synchronize()
    assert torch.cuda.mem_get_info()[0] >= free0 - 4 * MiB


@pytest.mark.gpu
@pytest.mark.uvm64k
def test_gpu_ioctl_script_passes():
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "uvm_ioctl_test.py")],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]


def test_ioctl_script_refuses_cleanly_without_the_module():
    if _skip_reason() is None:
        pytest.skip("the patched module answers here")
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "uvm_ioctl_test.py")],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr
    assert "cannot run here:" in out.stderr and "Traceback" not in out.stderr


def test_module_version_comes_from_sysfs(tmp_path):
    from pyvattn.backends.uvm import module_version

    f = tmp_path / "version"
    f.write_text("580.82.07\n")
    assert module_version(str(f)) == "580.82.07"
    assert module_version(str(tmp_path / "absent")) is None

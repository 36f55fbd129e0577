/* A strict stand-in for the libcuda VMM subset pyvattn calls, for tests and CPU checks without a GPU.
 *
 * It keeps the state a driver would (reservations, handles, mappings, access per mapping, the
 * current context per thread) and rejects what the real API rejects, so tests can check *what
 * pyvattn asks of the driver*: argument values, call counts and order, roll-back on failure,
 * context handling on other threads. Host memory (one memfd) stands behind "device" pages, so
 * mapped ranges can be read and written through CPU tensors. It proves nothing about the real
 * driver: the GPU tests and benchmarks do that.
 *
 * Thread-safe (one lock around every call), so the benchmarks' multi-threaded paths run on it.
 * Access belongs to a mapping, as the benchmarks expect of the real driver (bench_vmm.py checks
 * that on a GPU): cuMemUnmap forgets it, and a page mapped again has none until cuMemSetAccess.
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <pthread.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#define GRAN (2u << 20)
#define MAXN (1 << 16)
typedef int CUresult;
typedef struct { int type; int id; } Loc;
typedef struct { int type; int handleTypes; Loc location; void *win32; unsigned char flags[8]; } Prop;
typedef struct { Loc location; int flags; } Access;

static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
#define LOCKED(expr) do { pthread_mutex_lock(&mu); CUresult r_ = (expr); pthread_mutex_unlock(&mu); return r_; } while (0)

static int ctx_obj, ctx_refs, initialized;
static __thread void *current;
static struct { uint64_t base, size; } res[MAXN];
static struct { uint64_t size, off; int alive; } handles[MAXN];
static struct { uint64_t va, size, h; int access; } maps[MAXN];
static int nres, nhandles, nmaps, memfd = -1;
static uint64_t memfd_end;
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
static int handle_index(uint64_t h) { long i = (long)h - 1000; return (i >= 0 && i < nhandles && handles[i].alive) ? (int)i : -1; }
static int mapping_at(uint64_t a) {
    for (int j = 0; j < nmaps; j++) if (maps[j].size && a >= maps[j].va && a < maps[j].va + maps[j].size) return j;
    return -1;
}

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

static CUresult ctx_retain(void **ctx) { *ctx = &ctx_obj; ctx_refs++; return 0; }
static CUresult ctx_release(void) { if (ctx_refs <= 0) return 201; ctx_refs--; return 0; }
CUresult cuDevicePrimaryCtxRetain(void **ctx, int dev) { LOCKED(ctx_retain(ctx)); }
CUresult cuDevicePrimaryCtxRelease_v2(int dev) { LOCKED(ctx_release()); }
CUresult cuCtxGetCurrent(void **ctx) { if (!initialized) return 3; *ctx = current; return 0; }
CUresult cuCtxSetCurrent(void *ctx) { current = ctx; return 0; }
static CUresult ctx_sync(void) { if (!current) return 201; stub_calls[5]++; return 0; }
CUresult cuCtxSynchronize(void) { LOCKED(ctx_sync()); }

static CUresult mem_get_info(size_t *free, size_t *total) {
    if (!current) return 201;
    *total = (size_t)limit_pages * GRAN; *free = (size_t)(limit_pages - used_pages) * GRAN; return 0;
}
CUresult cuMemGetInfo_v2(size_t *free, size_t *total) { LOCKED(mem_get_info(free, total)); }
CUresult cuMemGetAllocationGranularity(size_t *g, const Prop *p, int opt) { if (!good_prop(p) || opt) return 1; *g = GRAN; return 0; }

static CUresult address_reserve(uint64_t *ptr, size_t size, size_t align, uint64_t addr, unsigned long long flags) {
    if (!size || size % GRAN || !align || align % GRAN || (align & (align - 1)) || addr || flags || nres == MAXN) return 1;
    char *raw = mmap(0, size + align, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (raw == MAP_FAILED) return 2;
    uint64_t base = ((uint64_t)raw + align - 1) / align * align;
    res[nres].base = base; res[nres].size = size; nres++; stub_calls[6]++;
    *ptr = base; return 0;
}
CUresult cuMemAddressReserve(uint64_t *ptr, size_t size, size_t align, uint64_t addr, unsigned long long flags) {
    LOCKED(address_reserve(ptr, size, align, addr, flags));
}
static CUresult address_free(uint64_t ptr, size_t size) {
    for (int i = 0; i < nres; i++) if (res[i].size && res[i].base == ptr) {
        if (res[i].size != size) return 1;
        for (int j = 0; j < nmaps; j++) if (maps[j].size && maps[j].va >= ptr && maps[j].va < ptr + size) return 1;
        munmap((void *)ptr, size); res[i].size = 0; stub_calls[7]++; return 0;
    }
    return 1;
}
CUresult cuMemAddressFree(uint64_t ptr, size_t size) { LOCKED(address_free(ptr, size)); }

static CUresult mem_create(uint64_t *h, size_t size, const Prop *p, unsigned long long flags) {
    if (!good_prop(p) || flags || !size || size % GRAN || nhandles == MAXN) return 1;
    stub_calls[3]++;
    if (used_pages + (long)(size / GRAN) > limit_pages) return 2;
    if (memfd < 0) memfd = memfd_create("stub-cuda", MFD_CLOEXEC);
    if (memfd < 0 || ftruncate(memfd, (off_t)(memfd_end + size))) return 2;
    used_pages += size / GRAN;
    handles[nhandles].size = size; handles[nhandles].off = memfd_end; handles[nhandles].alive = 1;
    memfd_end += size;
    *h = 1000 + nhandles++; return 0;
}
CUresult cuMemCreate(uint64_t *h, size_t size, const Prop *p, unsigned long long flags) { LOCKED(mem_create(h, size, p, flags)); }

static CUresult mem_release(uint64_t h) {
    int i = handle_index(h); if (i < 0) return 400;
    handles[i].alive = 0; used_pages -= handles[i].size / GRAN; stub_calls[4]++;
    fallocate(memfd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, (off_t)handles[i].off, (off_t)handles[i].size);
    return 0;
}
CUresult cuMemRelease(uint64_t h) { LOCKED(mem_release(h)); }

static CUresult mem_map(uint64_t va, size_t size, size_t offset, uint64_t h, unsigned long long flags) {
    int i = handle_index(h);
    if (!current) return 201;
    int slot = 0;  /* a free mapping slot: the first unused one */
    while (slot < nmaps && maps[slot].size) slot++;
    if (i < 0 || offset || flags || size != handles[i].size || va % GRAN || slot == MAXN) return 1;
    int inside = 0;
    for (int r = 0; r < nres; r++) inside |= res[r].size && va >= res[r].base && va + size <= res[r].base + res[r].size;
    if (!inside) return 1;
    for (int j = 0; j < nmaps; j++) if (maps[j].size && va < maps[j].va + maps[j].size && maps[j].va < va + size) return 208;
    if (stub_fail_map_after == 0) return 205;
    if (stub_fail_map_after > 0) stub_fail_map_after--;
    if (mmap((void *)va, size, PROT_NONE, MAP_SHARED | MAP_FIXED, memfd, (off_t)handles[i].off) == MAP_FAILED) return 2;
    maps[slot].va = va; maps[slot].size = size; maps[slot].h = h; maps[slot].access = 0;
    if (slot == nmaps) nmaps++;
    stub_calls[0]++; return 0;
}
CUresult cuMemMap(uint64_t va, size_t size, size_t offset, uint64_t h, unsigned long long flags) {
    LOCKED(mem_map(va, size, offset, h, flags));
}

static CUresult set_access(uint64_t va, size_t size, const Access *d, size_t count) {
    if (!current) return 201;
    if (count != 1 || d->location.type != 1 || d->location.id != 0 || d->flags != 3 || !size || size % GRAN) return 1;
    stub_calls[1]++;
    if (stub_fail_access) return 2;
    for (uint64_t a = va; a < va + size; a += GRAN)  /* the range must be fully mapped */
        if (mapping_at(a) < 0) return 1;
    for (int j = 0; j < nmaps; j++) if (maps[j].size && maps[j].va >= va && maps[j].va < va + size) maps[j].access = 1;
    mprotect((void *)va, size, PROT_READ | PROT_WRITE);
    return 0;
}
CUresult cuMemSetAccess(uint64_t va, size_t size, const Access *d, size_t count) { LOCKED(set_access(va, size, d, count)); }

static CUresult get_access(unsigned long long *flags, const Loc *loc, uint64_t va) {
    if (!current) return 201;
    if (!loc || loc->type != 1 || loc->id != 0) return 1;
    int j = mapping_at(va);
    if (j < 0) return 1;
    *flags = maps[j].access ? 3 : 0;
    return 0;
}
CUresult cuMemGetAccess(unsigned long long *flags, const Loc *loc, uint64_t va) { LOCKED(get_access(flags, loc, va)); }

static CUresult mem_unmap(uint64_t va, size_t size) {
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
CUresult cuMemUnmap(uint64_t va, size_t size) { LOCKED(mem_unmap(va, size)); }

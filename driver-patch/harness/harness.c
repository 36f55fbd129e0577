/*
 * harness.c: drives the KVC files (driver-patch/src/uvm_kvc*.c, compiled unchanged) through the
 * ioctl entry points and the stock hooks, against the model GPU of stubs.c/gpu_model.c, and
 * checks them against a reference model after every operation.
 *
 *   driver-harness [--seed N] [--ops N] [--interleavings N] [--threads-only] [--verbose]
 *   (or HARNESS_SEED, HARNESS_OPS, HARNESS_INTERLEAVINGS in the environment; --threads-only runs
 *   phase 5 alone, to replay or hunt a race quickly)
 *
 * Phases:
 *   1. scenarios with exact expectations: handle generations with ids reused, stale and foreign
 *      handles, forced non-zero roots (zeroing checked through the memory tags), limits (process,
 *      GPU, bookkeeping, mappings per page, EVICT), a forked child, GPU VA space and GPU
 *      unregister with live handles;
 *   2. counts: a decode step of 256 requests x 64 regions growing by one page each is one
 *      MAP_SCATTER with one TLB invalidate and one wait; fd close is O(1) waits; kernel
 *      bookkeeping bytes per mapped 64 KiB page;
 *   3. a script replayed with a failure injected at every fallible call (allocations, user
 *      copies, then GPU errors), each time checking all or nothing, then a clean teardown;
 *   4. random operations on three processes sharing two GPUs, with random failures;
 *   5. two threads of one process, one per GPU, racing on the shared va_space: free-running (the
 *      interleaving the machine gives), then taking turns under the stubs' seeded scheduler: one
 *      interleaving chosen on purpose (a chunk freed on one GPU while a PTE write to the same
 *      address is queued on the other) and HARNESS_INTERLEAVINGS drawn from the seed, each
 *      replayable (a failure names its interleaving).
 * After every operation: PTEs equal the model, no stale TLB entry, references equal the PTEs,
 * pool and process accounting exact, every GPU operation waited for, no lock held, no valid PTE
 * ever pointing at another process's data, no chunk freed while reachable.
 */
#include "harness.h"

#include <time.h>

#define NGPUS 2
#define NPROCS 3
#define AREA_BASE (1ULL << 40)
#define AREA_SLOTS (1u << 19)   // 32 GiB of VA per process, in 64 KiB slots
#define MAX_RANGES 96
// Phase 5 under the seeded scheduler: interleavings run by default, ops per thread in each.
#ifndef HARNESS_INTERLEAVINGS
#define HARNESS_INTERLEAVINGS 100
#endif
#define HARNESS_INTERLEAVING_OPS 200

// --- the world -----------------------------------------------------------------------------------

static harness_gpu_t *gpus[NGPUS];
static uvm_mmu_mode_hal_t pte_hal = { harness_pte_make };

typedef struct
{
    NvU64 handle;
    int gpu;
    NvU32 nslots;
    bool live;
    int ptes;                // PTEs mapping it, over every GPU
} m_page_t;

typedef struct
{
    NvU64 base, len;
} m_range_t;

typedef struct
{
    struct mm_struct mm;
    struct task_struct task;
    harness_file_t file;
    uvm_va_space_t *va_space;
    bool gpu_registered[NGPUS], gpu_va_space[NGPUS];
    m_page_t *pages;
    int npages, cap_pages;
    m_range_t ranges[MAX_RANGES];
    NvU32 *map[NGPUS];       // per 64 KiB slot of the area: 0 or (page + 1) << 4 | sub << 1 | ro
    int only_gpu;            // a thread's view of the process uses one GPU (-1: any)
    NvU32 area_first, area_slots;   // where its ranges go, in 2 MiB blocks of the area
} proc_t;

static proc_t procs[NPROCS];
static __thread NvU64 rng_state;

NvU64 harness_rand(void)
{
    NvU64 z = (rng_state += 0x9e3779b97f4a7c15ULL);

    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

static NvU64 rnd(NvU64 n)
{
    return n ? harness_rand() % n : 0;
}

static harness_gpu_t *gpu_new(int index)
{
    harness_gpu_t *hg = calloc(1, sizeof(*hg));

    hg->self = &hg->gpu;
    hg->gpu.id.value = index + 1;
    hg->gpu.parent = &hg->parent;
    hg->gpu.pmm.gpu = &hg->gpu;
    hg->gpu.channel_manager = hg;
    hg->gpu.mem_info.size = (NvU64)HARNESS_CHUNKS * UVM_CHUNK_SIZE_MAX;
    hg->parent.ce_hal = &harness_ce_hal;
    hg->parent.sparse_mappings_supported = true;
    hg->capacity = HARNESS_CHUNKS;
    memset(hg->gpu.uuid.uuid, 0x40 + index, 16);
    snprintf(hg->gpu.name, sizeof(hg->gpu.name), "GPU%d", index);
    return hg;
}

static void as_proc(proc_t *p)
{
    harness_current = &p->task;
}

static void gpu_va_space_add(proc_t *p, int g)
{
    uvm_gpu_va_space_t *gvs = calloc(1, sizeof(*gvs));

    gvs->gpu = &gpus[g]->gpu;
    gvs->page_tables.gpu = &gpus[g]->gpu;
    gvs->page_tables.hal = &pte_hal;
    gvs->page_tables.big_page_size = UVM_PAGE_SIZE_64K;
    uvm_mutex_init(&gvs->page_tables.lock, UVM_LOCK_ORDER_PAGE_TREE);
    p->va_space->gpu_va_spaces[g + 1] = gvs;
    p->gpu_va_space[g] = true;
}

static void proc_open(proc_t *p, int index)
{
    int g;

    memset(p, 0, sizeof(*p));
    p->mm.id = index + 1;
    p->task.mm = &p->mm;
    p->task.tgid = 1000 + index;
    p->va_space = calloc(1, sizeof(*p->va_space));
    p->va_space->id = index + 1;
    p->va_space->mm_enabled = index != 2; // the third process has no va_space_mm (first user owns)
    p->va_space->va_space_mm.mm = &p->mm;
    uvm_mutex_init(&p->va_space->lock, UVM_LOCK_ORDER_VA_SPACE);
    p->file.type = UVM_FD_VA_SPACE;
    p->file.va_space = p->va_space;
    p->only_gpu = -1;
    p->area_first = 0;
    p->area_slots = AREA_SLOTS / 32;
    for (g = 0; g < NGPUS; g++) {
        p->va_space->gpus[g + 1] = &gpus[g]->gpu;
        p->gpu_registered[g] = true;
        gpu_va_space_add(p, g);
        p->map[g] = calloc(AREA_SLOTS, sizeof(NvU32));
    }
}

// --- the model -------------------------------------------------------------------------------------

static NvU32 *slot_of(proc_t *p, int g, NvU64 va)
{
    if (va < AREA_BASE || va >= AREA_BASE + (NvU64)AREA_SLOTS * UVM_PAGE_SIZE_64K)
        harness_fail("VA 0x%llx outside the harness area", (unsigned long long)va);
    return &p->map[g][(va - AREA_BASE) / UVM_PAGE_SIZE_64K];
}

static int page_index(proc_t *p, NvU64 handle)
{
    int i;

    for (i = 0; i < p->npages; i++) {
        if (p->pages[i].handle == handle)
            return i;
    }
    return -1;
}

static void page_add(proc_t *p, NvU64 handle, int g, NvU32 nslots)
{
    if (page_index(p, handle) >= 0 && p->pages[page_index(p, handle)].live)
        harness_fail("ALLOC returned a live handle again: 0x%llx", (unsigned long long)handle);
    if (p->npages == p->cap_pages) {
        p->cap_pages = p->cap_pages * 2 + 64;
        p->pages = realloc(p->pages, p->cap_pages * sizeof(*p->pages));
    }
    p->pages[p->npages].handle = handle;
    p->pages[p->npages].gpu = g;
    p->pages[p->npages].nslots = nslots;
    p->pages[p->npages].live = true;
    p->pages[p->npages].ptes = 0;
    p->npages++;
}

static m_range_t *range_at(proc_t *p, NvU64 va, NvU64 len)
{
    int i;

    for (i = 0; i < MAX_RANGES; i++) {
        m_range_t *r = &p->ranges[i];

        if (r->len && r->base <= va && va + len <= r->base + r->len && va + len > va)
            return r;
    }
    return NULL;
}

static void model_set(proc_t *p, int g, NvU64 va, NvU32 value)
{
    NvU32 *slot = slot_of(p, g, va);

    if (*slot)
        p->pages[(*slot >> 4) - 1].ptes--;
    if (value)
        p->pages[(value >> 4) - 1].ptes++;
    *slot = value;
}

static void model_unmap(proc_t *p, int g, NvU64 start, NvU64 end)
{
    NvU64 va;

    if (!p->map[g])
        return; // a thread's view: that GPU is the other thread's

    for (va = start; va < end; va += UVM_PAGE_SIZE_64K)
        model_set(p, g, va, 0);
}

// --- the checks after every operation ---------------------------------------------------------

static uvm_kvc_va_space_t *kvc_of(proc_t *p)
{
    return p->va_space ? p->va_space->kvc : NULL;
}

static uvm_page_tree_t *tree_of(proc_t *p, int g)
{
    uvm_gpu_va_space_t *gvs = p->va_space->gpu_va_spaces[g + 1];

    return gvs ? &gvs->page_tables : NULL;
}

static NvU64 expected_phys(proc_t *p, NvU32 m, NvU32 *root_id, NvU32 *slot)
{
    uvm_kvc_va_space_t *kvc = kvc_of(p);
    m_page_t *page = &p->pages[(m >> 4) - 1];
    uvm_kvc_root_t *root;

    *root_id = (NvU32)(page->handle >> 5) & 0x7ffffff;
    *slot = ((NvU32)page->handle & 31) + ((m >> 1) & 7);
    root = idr_find(&kvc->roots, *root_id);
    if (!root)
        harness_fail("mapped page 0x%llx has no root", (unsigned long long)page->handle);
    return uvm_kvc_slot_phys(root, *slot);
}

// PTEs, blocks and references against the model. Cost: the process's mapped slots and blocks.
static void check_mappings(proc_t *p)
{
    uvm_kvc_va_space_t *kvc = kvc_of(p);
    static NvU32 refs[1 << 16][32];
    NvU32 touched_roots[4096];
    int ntouched = 0, g, i;

    if (!kvc)
        return;
    for (g = 0; g < NGPUS; g++) {
        uvm_kvc_gpu_t *kgpu = kvc->gpus[g + 1];
        uvm_page_tree_t *tree = tree_of(p, g);
        uvm_kvc_block_t *found[64];
        unsigned long index = 0;
        unsigned int n, b;
        NvU64 nblocks = 0, nempty = 0;

        if (!kgpu)
            continue;
        if (kgpu->tree && kgpu->tree != tree)
            harness_fail("KVC keeps the page tree of a GPU VA space that is gone");
        while ((n = radix_tree_gang_lookup(&kgpu->blocks, (void **)found, index, 64)) > 0) {
            for (b = 0; b < n; b++) {
                uvm_kvc_block_t *block = found[b];
                NvU32 e;

                nblocks++;
                nempty += block->mapped == 0;
                for (e = 0; e < 32; e++) {
                    NvU64 va = block->start + e * UVM_PAGE_SIZE_64K;
                    NvU32 m = *slot_of(p, g, va), root_id, slot;
                    NvU64 pte = harness_pte_at(tree, va);

                    if (!m) {
                        if (pte != 0 || (block->mapped & BIT(e)))
                            harness_fail("0x%llx on GPU%d: mapped (PTE 0x%llx) but the model says not",
                                         (unsigned long long)va, g, (unsigned long long)pte);
                        continue;
                    }
                    if (pte != ((expected_phys(p, m, &root_id, &slot)) | HARNESS_PTE_VALID | ((m & 1) ? HARNESS_PTE_RO : 0)))
                        harness_fail("0x%llx on GPU%d: PTE 0x%llx, model 0x%llx", (unsigned long long)va, g,
                                     (unsigned long long)pte, (unsigned long long)expected_phys(p, m, &root_id, &slot));
                    if (!(block->mapped & BIT(e)) || block->rec[e] != (root_id << 5 | slot))
                        harness_fail("0x%llx: block record disagrees with the PTE", (unsigned long long)va);
                    if (root_id >= (1 << 16))
                        harness_fail("root id %u beyond the check table", root_id);
                    if (refs[root_id][slot & ~(p->pages[(m >> 4) - 1].nslots - 1)]++ == 0 && ntouched < 4096)
                        touched_roots[ntouched++] = root_id << 5 | (slot & ~(p->pages[(m >> 4) - 1].nslots - 1));
                }
            }
            index = (unsigned long)(found[n - 1]->start >> KVC_BLOCK_SHIFT) + 1;
        }
        if (nblocks != kgpu->nblocks || nempty != kgpu->nempty)
            harness_fail("GPU%d: %llu blocks (%llu empty), KVC counts %llu (%llu)", g, (unsigned long long)nblocks,
                         (unsigned long long)nempty, (unsigned long long)kgpu->nblocks, (unsigned long long)kgpu->nempty);
    }
    // Every mapped slot of the model is in a block (the loop above saw only blocks). Only ranges
    // can hold mappings.
    for (g = 0; g < NGPUS; g++) {
        for (i = 0; i < MAX_RANGES; i++) {
            m_range_t *r = &p->ranges[i];
            NvU64 va;

            for (va = r->base; r->len && va < r->base + r->len; va += UVM_PAGE_SIZE_64K) {
                if (*slot_of(p, g, va) && !(kvc->gpus[g + 1] && radix_tree_lookup(&kvc->gpus[g + 1]->blocks, va >> 21)))
                    harness_fail("0x%llx is mapped in the model but KVC has no block for it", (unsigned long long)va);
            }
        }
    }
    // References: every root's head slots against the PTEs counted.
    for (i = 0; i < kvc->roots.cap; i++) {
        uvm_kvc_root_t *root = kvc->roots.ptrs[i];
        NvU32 slot;

        if (!root)
            continue;
        for (slot = 0; slot < 32; slot += 1u << root->order) {
            NvU32 want = i < (1 << 16) ? refs[i][slot] : 0;

            if (root->refs[slot] != want)
                harness_fail("root %d slot %u: %u PTE references, %u PTEs", i, slot, root->refs[slot], want);
            if (root->refs[slot] && !(root->used & BIT(slot)))
                harness_fail("root %d slot %u mapped but not used", i, slot);
            if ((root->live & BIT(slot)) && !(root->used & BIT(slot)))
                harness_fail("root %d slot %u live but not used", i, slot);
        }
    }
    for (i = 0; i < ntouched; i++)
        refs[touched_roots[i] >> 5][touched_roots[i] & 31] = 0;
    if (ntouched == 4096)
        memset(refs, 0, sizeof(refs));
}

// Pool, process and bookkeeping accounting; handles valid exactly when the model says live.
static void check_accounting(proc_t *p)
{
    uvm_kvc_va_space_t *kvc = kvc_of(p);
    NvU64 roots[NGPUS] = { 0 }, meta = 0, nkgpu = 0, blocks = 0;
    int i, g;

    if (!kvc)
        return;
    NvU64 live = 0, model_live = 0;

    for (i = 0; i < kvc->roots.cap; i++) {
        uvm_kvc_root_t *root = kvc->roots.ptrs[i];

        if (root) {
            live += __builtin_popcount(root->live);
            roots[root->kgpu->gpu->id.value - 1]++;
            if (root->used == 0)
                harness_fail("root %d has no used slot but was not freed", i);
        }
    }
    for (g = 0; g < UVM_ID_MAX_GPUS; g++) {
        uvm_kvc_gpu_t *kgpu = kvc->gpus[g];

        if (!kgpu)
            continue;
        nkgpu++;
        blocks += kgpu->nblocks;
        if (g >= 1 && g <= NGPUS && kgpu->bytes != roots[g - 1] * UVM_CHUNK_SIZE_MAX)
            harness_fail("GPU%d pool says %llu bytes, %llu roots", g - 1, (unsigned long long)kgpu->bytes,
                         (unsigned long long)roots[g - 1]);
    }
    meta = (roots[0] + roots[1]) * sizeof(uvm_kvc_root_t) + blocks * sizeof(uvm_kvc_block_t) + nkgpu * sizeof(uvm_kvc_gpu_t);
    if ((NvU64)atomic64_read(&kvc->proc->meta_bytes) != meta)
        harness_fail("bookkeeping: KVC counts %lld bytes, the structures are %llu",
                     atomic64_read(&kvc->proc->meta_bytes), (unsigned long long)meta);
    for (g = 0; g < NGPUS; g++) {
        if ((NvU64)atomic64_read(&kvc->proc->bytes[g + 1]) != roots[g] * UVM_CHUNK_SIZE_MAX)
            harness_fail("process accounting on GPU%d: %lld bytes, %llu roots", g,
                         atomic64_read(&kvc->proc->bytes[g + 1]), (unsigned long long)roots[g]);
    }
    for (i = 0; i < p->npages; i++)
        model_live += p->pages[i].live;
    if (live != model_live)
        harness_fail("%llu live handles in KVC, %llu in the model", (unsigned long long)live, (unsigned long long)model_live);
    for (i = 0; i < p->npages; i++) {
        NvU64 phys, size, refs;
        NV_STATUS status = uvm_kvc_handle_info(kvc, p->pages[i].handle, &phys, &size, &refs);

        if (p->pages[i].live && (status != NV_OK || size != p->pages[i].nslots * UVM_PAGE_SIZE_64K))
            harness_fail("live handle 0x%llx: %s", (unsigned long long)p->pages[i].handle, nvstatusToString(status));
        if (!p->pages[i].live && status != NV_ERR_INVALID_OBJECT_HANDLE)
            harness_fail("freed handle 0x%llx still answers", (unsigned long long)p->pages[i].handle);
    }
}

static void check_tlb(void)
{
    int g, i;

    for (g = 0; g < NGPUS; g++) {
        for (i = 0; i < HARNESS_TLB_SIZE; i++) {
            harness_tlb_entry_t *e = &gpus[g]->tlb[i];

            if (e->tree && e->pte != harness_pte_at(e->tree, e->va))
                harness_fail("stale TLB entry on GPU%d at 0x%llx after the ioctl returned", g, (unsigned long long)e->va);
        }
    }
}

static void check_all(void)
{
    int i;

    if (harness_locks_held())
        harness_fail("a lock is still held after the operation");
    harness_check_no_pending_work();
    for (i = 0; i < NPROCS; i++) {
        int g;

        for (g = 0; procs[i].va_space && g < NGPUS; g++) {
            if (tree_of(&procs[i], g))
                harness_tracker_prune(&tree_of(&procs[i], g)->tracker);
        }
    }
    harness_free_pushes();
    check_tlb();
    for (i = 0; i < NPROCS; i++) {
        if (procs[i].va_space && !hfi.gpu_fatal) {
            check_mappings(&procs[i]);
            check_accounting(&procs[i]);
        }
    }
    hc.op_index++;
}

// --- ioctls, as uvm.c's routing calls them ---------------------------------------------------

// UVM_ROUTE_CMD_*_INIT_CHECK: a file that is not a va_space fd gets NV_ERR_ILLEGAL_ACTION.
#define ROUTE(p, fn, params) \
    ((p)->file.type != UVM_FD_VA_SPACE ? NV_ERR_ILLEGAL_ACTION : fn((params), (struct file *)&(p)->file))

static const NvProcessorUuid *uuid_of(int g)
{
    static NvProcessorUuid bad;

    memset(bad.uuid, 0x7e, 16);
    return g >= 0 && g < NGPUS ? &gpus[g]->gpu.uuid : &bad;
}

static NV_STATUS do_alloc(proc_t *p, int g, NvU64 page_size, NvU32 flags, NvU64 count, NvU64 *handles)
{
    UVM_KVC_ALLOC_PARAMS params = { UVM_KVC_ABI_VERSION, flags };

    params.gpuUuid = *uuid_of(g);
    params.pageSize = page_size;
    params.count = count;
    params.handlesPtr = (NvU64)(uintptr_t)handles;
    as_proc(p);
    params.rmStatus = ROUTE(p, uvm_api_kvc_alloc, &params);
    if (params.rmStatus == NV_OK && params.countDone != count)
        harness_fail("ALLOC OK with countDone %llu", (unsigned long long)params.countDone);
    return params.rmStatus;
}

static NV_STATUS do_free(proc_t *p, NvU32 flags, NvU64 count, NvU64 *handles)
{
    UVM_KVC_FREE_PARAMS params = { UVM_KVC_ABI_VERSION, flags };

    params.count = count;
    params.handlesPtr = (NvU64)(uintptr_t)handles;
    as_proc(p);
    return ROUTE(p, uvm_api_kvc_free, &params);
}

static NV_STATUS do_create_range(proc_t *p, NvU64 base, NvU64 len)
{
    UVM_KVC_CREATE_RANGE_PARAMS params = { UVM_KVC_ABI_VERSION, 0 };

    params.base = base;
    params.length = len;
    as_proc(p);
    return ROUTE(p, uvm_api_kvc_create_range, &params);
}

static NV_STATUS do_map(proc_t *p, int g, NvU32 flags, NvU64 base, NvU64 count, NvU64 *handles)
{
    UVM_KVC_MAP_PARAMS params = { UVM_KVC_ABI_VERSION, flags };

    params.gpuUuid = *uuid_of(g);
    params.base = base;
    params.count = count;
    params.handlesPtr = (NvU64)(uintptr_t)handles;
    as_proc(p);
    return ROUTE(p, uvm_api_kvc_map, &params);
}

static NV_STATUS do_scatter(proc_t *p, int g, NvU32 flags, NvU64 count, UVM_KVC_SCATTER_ENTRY *entries)
{
    UVM_KVC_MAP_SCATTER_PARAMS params = { UVM_KVC_ABI_VERSION, flags };

    params.gpuUuid = *uuid_of(g);
    params.count = count;
    params.entriesPtr = (NvU64)(uintptr_t)entries;
    as_proc(p);
    return ROUTE(p, uvm_api_kvc_map_scatter, &params);
}

static NV_STATUS do_unmap(proc_t *p, int g, NvU64 base, NvU64 len)
{
    UVM_KVC_UNMAP_PARAMS params = { UVM_KVC_ABI_VERSION, 0 };

    params.gpuUuid = *uuid_of(g);
    params.base = base;
    params.length = len;
    as_proc(p);
    return ROUTE(p, uvm_api_kvc_unmap, &params);
}

static UVM_KVC_QUERY_PARAMS do_query(proc_t *p, int g)
{
    UVM_KVC_QUERY_PARAMS params = { UVM_KVC_ABI_VERSION, 0 };

    if (g >= 0)
        params.gpuUuid = *uuid_of(g);
    params.rmStatus = uvm_api_kvc_query(&params, (struct file *)&p->file);
    if (params.rmStatus != NV_OK || params.magic != UVM_KVC_MAGIC)
        harness_fail("QUERY failed");
    return params;
}

// Stock UVM_FREE of a KVC range: uvm_free() -> uvm_va_range_destroy_external() -> the hook.
static void do_uvm_free(proc_t *p, m_range_t *r)
{
    uvm_va_space_t *va_space = p->va_space;
    size_t i;
    int g;

    as_proc(p);
    uvm_va_space_down_write(va_space);
    for (i = 0; i < ARRAY_SIZE(va_space->ranges); i++) {
        if (va_space->ranges[i] && va_space->ranges[i]->node.start == r->base) {
            uvm_kvc_range_destroyed(va_space->ranges[i]);
            free(va_space->ranges[i]);
            va_space->ranges[i] = NULL;
        }
    }
    uvm_va_space_up_write(va_space);
    for (g = 0; g < NGPUS; g++)
        model_unmap(p, g, r->base, r->base + r->len);
    r->len = 0;
}

// remove_gpu_va_space(): UVM_UNREGISTER_GPU_VASPACE, or the first step of a GPU unregister.
static void do_remove_gpu_va_space(proc_t *p, int g)
{
    uvm_va_space_t *va_space = p->va_space;
    int i;

    if (!p->gpu_va_space[g])
        return;
    uvm_va_space_down_write(va_space);
    uvm_kvc_remove_gpu_va_space(va_space, &gpus[g]->gpu);
    free(va_space->gpu_va_spaces[g + 1]);
    va_space->gpu_va_spaces[g + 1] = NULL;
    uvm_va_space_up_write(va_space);
    p->gpu_va_space[g] = false;
    for (i = 0; i < MAX_RANGES; i++) {
        if (p->ranges[i].len)
            model_unmap(p, g, p->ranges[i].base, p->ranges[i].base + p->ranges[i].len);
    }
}

// unregister_gpu(): the GPU VA space goes first, then the pool.
static void do_unregister_gpu(proc_t *p, int g)
{
    uvm_va_space_t *va_space = p->va_space;
    int i;

    if (!p->gpu_registered[g])
        return;
    do_remove_gpu_va_space(p, g);
    uvm_va_space_down_write(va_space);
    uvm_kvc_unregister_gpu(va_space, &gpus[g]->gpu);
    va_space->gpus[g + 1] = NULL;
    uvm_va_space_up_write(va_space);
    p->gpu_registered[g] = false;
    for (i = 0; i < p->npages; i++) {
        if (p->pages[i].gpu == g)
            p->pages[i].live = false;
    }
}

static void do_register_gpu(proc_t *p, int g)
{
    uvm_va_space_down_write(p->va_space);
    if (!p->gpu_registered[g]) {
        p->va_space->gpus[g + 1] = &gpus[g]->gpu;
        p->gpu_registered[g] = true;
    }
    if (!p->gpu_va_space[g])
        gpu_va_space_add(p, g);
    uvm_va_space_up_write(p->va_space);
}

// uvm_release() -> uvm_va_space_destroy(): ranges, then every GPU, then the va_space.
static void do_close(proc_t *p)
{
    uvm_va_space_t *va_space = p->va_space;
    int i, g;

    as_proc(p);
    for (i = 0; i < MAX_RANGES; i++) {
        if (p->ranges[i].len)
            do_uvm_free(p, &p->ranges[i]);
    }
    for (g = 0; g < NGPUS; g++)
        do_unregister_gpu(p, g);
    uvm_kvc_va_space_destroy(va_space);
    for (i = 0; i < (int)ARRAY_SIZE(va_space->ranges); i++)
        free(va_space->ranges[i]);
    for (g = 0; g < NGPUS; g++)
        free(p->map[g]);
    free(p->pages);
    free(va_space);
    memset(p, 0, sizeof(*p));
}

// --- operations with their expected outcome ----------------------------------------------------

static const NvU64 page_sizes[3] = { 64ULL << 10, 128ULL << 10, 256ULL << 10 };

// A failure is acceptable only when a failure was injected (then nothing may have changed, which
// the checks after the operation verify) or when `expect_ok` is false. On success the model
// takes the operation whole.
static void expect(const char *what, NV_STATUS status, bool expect_ok)
{
    if (status == NV_OK && !expect_ok && !hfi.gpu_fatal)
        harness_fail("%s succeeded where it must fail", what);
    if (status != NV_OK && expect_ok && !hfi.hit && !hfi.gpu_fatal)
        harness_fail("%s failed: %s", what, nvstatusToString(status));
    // A success after an injected failure is a fallback that worked (a tracker copy that could
    // not be made is replaced by a wait): the checks after the operation hold it to the model.
    if (hfi.hit)
        hfi.hit = 0;
}

static bool gpu_usable(proc_t *p, int g)
{
    return g >= 0 && g < NGPUS && p->gpu_registered[g] && p->gpu_va_space[g];
}

// Slots of each new page hold zeros, or (recycled without ZERO) this va_space's own data.
static void check_new_pages(proc_t *p, NvU64 *handles, NvU64 count, bool zero)
{
    NvU64 i, phys, size, refs, s;

    for (i = 0; i < count; i++) {
        if (uvm_kvc_handle_info(kvc_of(p), handles[i], &phys, &size, &refs) != NV_OK || refs)
            harness_fail("new handle 0x%llx unusable", (unsigned long long)handles[i]);
        for (s = 0; s < size; s += UVM_PAGE_SIZE_64K) {
            harness_gpu_t *hg = gpus[p->pages[page_index(p, handles[i])].gpu];
            harness_chunk_t *c = harness_chunk_at(hg, phys + s);
            int tag = c->tags[(phys + s - c->chunk.address) / UVM_PAGE_SIZE_64K];

            if (tag != 0 && (zero || tag != p->va_space->id))
                harness_fail("new page 0x%llx holds %s data", (unsigned long long)handles[i],
                             tag == HARNESS_FOREIGN ? "another process's" : "stale");
        }
    }
}

static void op_alloc(proc_t *p, int g, NvU64 page_size, NvU32 flags, NvU64 count)
{
    NvU64 *handles = calloc(count ? count : 1, sizeof(NvU64)), i;
    bool ok = gpu_usable(p, g) && count > 0 && count <= UVM_KVC_MAX_BATCH && !(flags & UVM_KVC_ALLOC_FLAGS_EVICT);
    NV_STATUS status = do_alloc(p, g, page_size, flags, count, handles);

    expect("ALLOC", status, ok);
    if (status == NV_OK) {
        for (i = 0; i < count; i++)
            page_add(p, handles[i], g, (NvU32)(page_size >> 16));
        check_new_pages(p, handles, count, flags & UVM_KVC_ALLOC_FLAGS_ZERO);
    }
    free(handles);
}

static int live_page(proc_t *p, int g)
{
    int tries;

    for (tries = 0; tries < 16 && p->npages; tries++) {
        int i = (int)rnd(p->npages);

        if (p->pages[i].live && (g < 0 || p->pages[i].gpu == g))
            return i;
    }
    return -1;
}

static void op_free(proc_t *p)
{
    NvU64 handles[10];
    int idx[10], n = 1 + (int)rnd(8), i, j, k = 0;
    NvU32 flags = rnd(4) == 0 ? UVM_KVC_FREE_FLAGS_FAIL_IF_MAPPED : 0;
    bool ok = true;
    NV_STATUS status;

    for (i = 0; i < n; i++) {
        int pi = rnd(10) == 0 && p->npages ? (int)rnd(p->npages) : live_page(p, -1);

        if (pi < 0)
            continue;
        idx[k] = pi;
        handles[k++] = p->pages[pi].handle;
        ok &= p->pages[pi].live && !(flags && p->pages[pi].ptes);
        for (j = 0; j < k - 1; j++)
            ok &= handles[j] != handles[k - 1];
    }
    if (rnd(20) == 0 && k < 10) {
        handles[k] = harness_rand();
        idx[k++] = -1;
        ok = false;
    }
    if (k == 0)
        return;
    status = do_free(p, flags, k, handles);
    expect("FREE", status, ok);
    for (i = 0; status == NV_OK && i < k; i++)
        p->pages[idx[i]].live = false;
}

static void op_create_range(proc_t *p)
{
    NvU64 len = (1 + rnd(6)) * UVM_PAGE_SIZE_2M;
    NvU64 base = AREA_BASE + (p->area_first + rnd(p->area_slots - 8)) * UVM_PAGE_SIZE_2M;
    int i, free_slot = -1, live = 0;
    bool ok = true;
    NV_STATUS status;

    if (rnd(10) == 0) {
        base += UVM_PAGE_SIZE_64K;
        ok = false;
    }
    for (i = 0; i < MAX_RANGES; i++) {
        m_range_t *r = &p->ranges[i];

        if (!r->len) {
            if (free_slot < 0)
                free_slot = i;
            continue;
        }
        live++;
        if (r->base < base + len && base < r->base + r->len)
            ok = false;
    }
    if (free_slot < 0 || live >= (p->only_gpu >= 0 ? MAX_RANGES / NGPUS : MAX_RANGES))
        return;
    status = do_create_range(p, base, len);
    expect("CREATE_RANGE", status, ok);
    if (status == NV_OK) {
        p->ranges[free_slot].base = base;
        p->ranges[free_slot].len = len;
    }
}

static int pick_gpu(proc_t *p)
{
    return p->only_gpu >= 0 ? p->only_gpu : (int)rnd(NGPUS);
}

static m_range_t *some_range(proc_t *p)
{
    int i, start = (int)rnd(MAX_RANGES);

    for (i = 0; i < MAX_RANGES; i++) {
        m_range_t *r = &p->ranges[(start + i) % MAX_RANGES];

        if (r->len)
            return r;
    }
    return NULL;
}

// Expected outcome of mapping `count` pages (model indexes) at `vas` on g, and the model update.
static bool map_predict(proc_t *p, int g, NvU32 flags, const int *pages, const NvU64 *vas, int count)
{
    int i, j;
    NvU64 va;

    if (!gpu_usable(p, g))
        return false;
    for (i = 0; i < count; i++) {
        m_page_t *page = pages[i] >= 0 ? &p->pages[pages[i]] : NULL;
        int uses = 0;

        if (!page || !page->live || page->gpu != g || !range_at(p, vas[i], page->nslots * UVM_PAGE_SIZE_64K))
            return false;
        for (j = 0; j < count; j++)
            uses += pages[j] == pages[i];
        if (page->ptes + uses * page->nslots > page->nslots * UVM_KVC_MAX_MAPPINGS_PER_PAGE)
            return false;
        for (j = 0; j < count; j++) {
            if (j != i && vas[j] < vas[i] + page->nslots * UVM_PAGE_SIZE_64K &&
                vas[i] < vas[j] + p->pages[pages[j] >= 0 ? pages[j] : 0].nslots * UVM_PAGE_SIZE_64K)
                return false;
        }
        for (va = vas[i]; (flags & UVM_KVC_MAP_FLAGS_NO_REPLACE) && va < vas[i] + page->nslots * UVM_PAGE_SIZE_64K;
             va += UVM_PAGE_SIZE_64K) {
            if (*slot_of(p, g, va))
                return false;
        }
    }
    return true;
}

static void map_apply(proc_t *p, int g, NvU32 flags, const int *pages, const NvU64 *vas, int count)
{
    int i;
    NvU32 sub;

    for (i = 0; i < count; i++) {
        for (sub = 0; sub < p->pages[pages[i]].nslots; sub++)
            model_set(p, g, vas[i] + sub * UVM_PAGE_SIZE_64K,
                      (NvU32)(pages[i] + 1) << 4 | sub << 1 | !!(flags & UVM_KVC_MAP_FLAGS_READ_ONLY));
    }
}

static NvU32 random_map_flags(void)
{
    return (rnd(2) ? UVM_KVC_MAP_FLAGS_NO_REPLACE : 0) | (rnd(5) == 0 ? UVM_KVC_MAP_FLAGS_READ_ONLY : 0);
}

static void op_map(proc_t *p)
{
    m_range_t *r = some_range(p);
    int g = pick_gpu(p), count = 1 + (int)rnd(8), pages[8], i;
    NvU64 vas[8], handles[8], va;
    NvU32 flags = random_map_flags();
    NV_STATUS status;
    bool ok;

    if (!r)
        return;
    va = r->base + rnd(r->len / UVM_PAGE_SIZE_64K) * UVM_PAGE_SIZE_64K;
    for (i = 0; i < count; i++) {
        pages[i] = rnd(12) == 0 && p->npages ? (int)rnd(p->npages) : live_page(p, g);
        if (pages[i] < 0)
            return;
        handles[i] = p->pages[pages[i]].handle;
        vas[i] = va;
        va += p->pages[pages[i]].nslots * UVM_PAGE_SIZE_64K;
    }
    ok = map_predict(p, g, flags, pages, vas, count);
    status = do_map(p, g, flags, vas[0], count, handles);
    expect("MAP", status, ok);
    if (status == NV_OK)
        map_apply(p, g, flags, pages, vas, count);
}

static void op_scatter(proc_t *p, int max_entries)
{
    int g = pick_gpu(p), count = 1 + (int)rnd(max_entries), i;
    int *pages = calloc(count, sizeof(int));
    NvU64 *vas = calloc(count, sizeof(NvU64));
    UVM_KVC_SCATTER_ENTRY *entries = calloc(count, sizeof(*entries));
    NvU32 flags = random_map_flags();
    NV_STATUS status;
    bool ok;

    for (i = 0; i < count; i++) {
        m_range_t *r = some_range(p);

        pages[i] = rnd(16) == 0 && p->npages ? (int)rnd(p->npages) : live_page(p, g);
        if (!r || pages[i] < 0)
            goto out;
        vas[i] = r->base + rnd(r->len / UVM_PAGE_SIZE_64K) * UVM_PAGE_SIZE_64K;
        if (rnd(40) == 0)
            vas[i] += 4096;
        entries[i].va = vas[i];
        entries[i].handle = p->pages[pages[i]].handle;
    }
    ok = map_predict(p, g, flags, pages, vas, count);
    for (i = 0; i < count && ok; i++)
        ok = IS_ALIGNED(vas[i], UVM_PAGE_SIZE_64K);
    status = do_scatter(p, g, flags, count, entries);
    expect("MAP_SCATTER", status, ok);
    if (status == NV_OK)
        map_apply(p, g, flags, pages, vas, count);
out:
    free(pages);
    free(vas);
    free(entries);
}

static void op_unmap(proc_t *p)
{
    m_range_t *r = some_range(p);
    int g = pick_gpu(p);
    NvU64 slots, first, n, base, len;
    NV_STATUS status;
    bool ok;

    if (!r)
        return;
    slots = r->len / UVM_PAGE_SIZE_64K;
    first = rnd(slots);
    n = 1 + rnd(slots - first);
    base = r->base + first * UVM_PAGE_SIZE_64K;
    len = n * UVM_PAGE_SIZE_64K;
    if (rnd(10) == 0)
        len += r->len;     // past the end of the range
    ok = p->gpu_registered[g] && range_at(p, base, len);
    status = do_unmap(p, g, base, len);
    expect("UNMAP", status, ok);
    if (status == NV_OK)
        model_unmap(p, g, base, base + len);
}

// GPU kernels touching the VA: mapped pages hold zeros or this process's data (never another
// process's), writes tag them, and an unmapped VA faults instead of reaching a stale page.
static void op_access(proc_t *p)
{
    m_range_t *r = some_range(p);
    int g = pick_gpu(p), i, tag;

    if (!r || !p->gpu_va_space[g])
        return;
    for (i = 0; i < 8; i++) {
        NvU64 va = r->base + rnd(r->len / UVM_PAGE_SIZE_64K) * UVM_PAGE_SIZE_64K;
        NvU32 m = *slot_of(p, g, va);
        bool write = rnd(2);
        bool ok = harness_gpu_access(gpus[g], tree_of(p, g), va, write, p->va_space->id, &tag);

        if (!m && ok)
            harness_fail("GPU access to unmapped 0x%llx succeeded", (unsigned long long)va);
        if (m && !ok && !(write && (m & 1)))
            harness_fail("GPU access to mapped 0x%llx faulted", (unsigned long long)va);
        if (m && ok && tag != 0 && tag != p->va_space->id)
            harness_fail("GPU read at 0x%llx sees another process's data", (unsigned long long)va);
    }
}

static void op_query(proc_t *p)
{
    int g = pick_gpu(p);
    UVM_KVC_QUERY_PARAMS q;
    uvm_kvc_gpu_t *kgpu;

    as_proc(p);
    q = do_query(p, g);
    kgpu = kvc_of(p) ? kvc_of(p)->gpus[g + 1] : NULL;
    if (!(q.callerState & UVM_KVC_CALLER_OWNS_VA_SPACE))
        harness_fail("QUERY: the owner is told it does not own its va_space");
    if (p->gpu_registered[g] && q.fdBytes != (kgpu ? kgpu->bytes : 0))
        harness_fail("QUERY fdBytes %llu", (unsigned long long)q.fdBytes);
    if (p->gpu_registered[g] && q.processBytes != q.fdBytes)
        harness_fail("QUERY processBytes %llu != fdBytes %llu", (unsigned long long)q.processBytes,
                     (unsigned long long)q.fdBytes);
}

// A forked child holds the fd: every KVC ioctl refuses it, QUERY says so, nothing changes.
static void op_fork(proc_t *p)
{
    struct mm_struct child_mm = { 99 };
    struct task_struct child = { &child_mm, 4242 };
    UVM_KVC_SCATTER_ENTRY entry = { AREA_BASE, 0 };
    UVM_KVC_QUERY_PARAMS q;
    NvU64 handle = p->npages ? p->pages[0].handle : 1;

    if (!p->va_space->mm_enabled && !kvc_of(p))
        return; // without va_space_mm, the first process to use KVC becomes the owner
    hfi.kinds = 0;
    harness_current = &child;
    {
        NV_STATUS st[5];
        int i;

        st[0] = uvm_api_kvc_alloc(&(UVM_KVC_ALLOC_PARAMS){ UVM_KVC_ABI_VERSION, 0, *uuid_of(0), UVM_PAGE_SIZE_64K, 1,
                                                           (NvU64)(uintptr_t)&handle }, (struct file *)&p->file);
        st[1] = uvm_api_kvc_free(&(UVM_KVC_FREE_PARAMS){ UVM_KVC_ABI_VERSION, 0, 1, (NvU64)(uintptr_t)&handle },
                                 (struct file *)&p->file);
        st[2] = uvm_api_kvc_map_scatter(&(UVM_KVC_MAP_SCATTER_PARAMS){ UVM_KVC_ABI_VERSION, 0, *uuid_of(0),
                                                                      (NvU64)(uintptr_t)&entry, 1 }, (struct file *)&p->file);
        st[3] = uvm_api_kvc_unmap(&(UVM_KVC_UNMAP_PARAMS){ UVM_KVC_ABI_VERSION, 0, *uuid_of(0), AREA_BASE, UVM_PAGE_SIZE_2M },
                                  (struct file *)&p->file);
        st[4] = uvm_api_kvc_create_range(&(UVM_KVC_CREATE_RANGE_PARAMS){ UVM_KVC_ABI_VERSION, 0, AREA_BASE, UVM_PAGE_SIZE_2M },
                                         (struct file *)&p->file);
        for (i = 0; i < 5; i++) {
            if (st[i] != NV_ERR_ILLEGAL_ACTION)
                harness_fail("a forked child's KVC ioctl %d was answered %s, not NV_ERR_ILLEGAL_ACTION", i, nvstatusToString(st[i]));
        }
    }
    q = do_query(p, 0);
    if (q.callerState & UVM_KVC_CALLER_OWNS_VA_SPACE)
        harness_fail("QUERY tells a forked child it owns the va_space");
    as_proc(p);
}

static void op_gpu_churn(proc_t *p)
{
    int g = pick_gpu(p);

    as_proc(p);
    switch (rnd(4)) {
        case 0: do_remove_gpu_va_space(p, g); break;
        case 1: do_unregister_gpu(p, g); break;
        default: do_register_gpu(p, g); break;
    }
}

// --- worlds ------------------------------------------------------------------------------------

static long long kv_baseline;

static void world_open(void)
{
    int i;

    for (i = 0; i < NGPUS; i++)
        gpus[i] = gpu_new(i);
    for (i = 0; i < NPROCS; i++)
        proc_open(&procs[i], i);
    harness_current = &procs[0].task;
}

// Every process closes its fd; then nothing may be left: no chunk (except roots a GPU error
// leaked), no page table, no kernel memory, no mm reference.
static NvU64 world_close(void)
{
    NvU64 leaked = 0;
    int i, g;

    hfi.kinds = 0;
    for (i = 0; i < NPROCS; i++) {
        if (procs[i].va_space)
            do_close(&procs[i]);
    }
    check_all();
    for (g = 0; g < NGPUS; g++) {
        if (gpus[g]->live_chunks && !hfi.gpu_fatal)
            harness_fail("GPU%d: %d chunks not returned to PMM after every fd closed", g, gpus[g]->live_chunks);
        leaked += gpus[g]->live_chunks;
        free(gpus[g]);
    }
    if (hc.kv_bytes != kv_baseline || hc.mm_grabs)
        harness_fail("after every fd closed: %lld bytes of kernel memory, %lld mm references left",
                     hc.kv_bytes - kv_baseline, hc.mm_grabs);
    if (hc.tables_got != hc.tables_put)
        harness_fail("%llu page tables taken, %llu put", (unsigned long long)hc.tables_got,
                     (unsigned long long)hc.tables_put);
    hfi.gpu_fatal = false;
    return leaked;
}

static void set_default_params(void)
{
    harness_param_set("uvm_kvc_max_gpu_percent", 100);
    harness_param_set("uvm_kvc_max_mb_per_process", 0);
    harness_param_set("uvm_kvc_max_meta_mb_per_process", 256);
    harness_param_set("uvm_kvc_allow_evict", 0);
    hc.pmm_zero_mode = HARNESS_ZERO_RANDOM;
    hc.idr_reuse = false;
}

static void range_add(proc_t *p, NvU64 base, NvU64 len)
{
    NV_STATUS status = do_create_range(p, base, len);
    int i;

    expect("CREATE_RANGE", status, true);
    if (status != NV_OK)
        return;
    for (i = 0; i < MAX_RANGES && p->ranges[i].len; i++)
        ;
    p->ranges[i].base = base;
    p->ranges[i].len = len;
    check_all();
}

static NvU64 alloc_one(proc_t *p, int g, NvU64 page_size, NvU32 flags)
{
    op_alloc(p, g, page_size, flags, 1);
    check_all();
    return p->pages[p->npages - 1].handle;
}

// --- phase 1: scenarios with exact expectations ----------------------------------------------

static void scenario_generations(void)
{
    proc_t *p = &procs[0];
    NvU64 keep, stale, fresh, entry_va = AREA_BASE;
    UVM_KVC_SCATTER_ENTRY e;

    range_add(p, AREA_BASE, UVM_PAGE_SIZE_2M);
    // The same slot again (the root stays: another page holds it): same id, new generation.
    keep = alloc_one(p, 0, UVM_PAGE_SIZE_64K, 0);
    stale = alloc_one(p, 0, UVM_PAGE_SIZE_64K, 0);
    expect("FREE", do_free(p, 0, 1, &stale), true);
    p->pages[page_index(p, stale)].live = false;
    fresh = alloc_one(p, 0, UVM_PAGE_SIZE_64K, 0);
    if ((NvU32)fresh != (NvU32)stale || fresh == stale)
        harness_fail("slot reuse: handle 0x%llx after 0x%llx", (unsigned long long)fresh, (unsigned long long)stale);
    if (do_free(p, 0, 1, &stale) != NV_ERR_INVALID_OBJECT_HANDLE ||
        do_map(p, 0, 0, entry_va, 1, &stale) != NV_ERR_INVALID_OBJECT_HANDLE)
        harness_fail("a stale handle whose id was reused is not refused");
    e.va = entry_va;
    e.handle = stale;
    if (do_scatter(p, 0, 0, 1, &e) != NV_ERR_INVALID_OBJECT_HANDLE)
        harness_fail("MAP_SCATTER takes a stale handle");
    check_all();

    // A root id reused (the idr hands out the lowest free id): a stale handle is refused.
    hc.idr_reuse = true;
    expect("FREE", do_free(p, 0, 1, &keep), true);
    p->pages[page_index(p, keep)].live = false;
    expect("FREE", do_free(p, 0, 1, &fresh), true);
    p->pages[page_index(p, fresh)].live = false;
    check_all();
    fresh = alloc_one(p, 0, UVM_PAGE_SIZE_64K, 0);
    if ((NvU32)fresh != (NvU32)keep)
        harness_fail("root id reuse did not happen (0x%llx after 0x%llx)", (unsigned long long)fresh, (unsigned long long)keep);
    if (do_free(p, 0, 1, &keep) != NV_ERR_INVALID_OBJECT_HANDLE)
        harness_fail("a stale handle of a reused root id is accepted");

    // Generations wrap without ever producing 0 or repeating a live handle.
    kvc_of(p)->gen = 0xfffffffeU;
    op_alloc(p, 0, UVM_PAGE_SIZE_64K, 0, 4);
    check_all();

    // Another process's handle: never one of this process's pages.
    if (do_free(&procs[1], 0, 1, &fresh) != NV_ERR_INVALID_OBJECT_HANDLE)
        harness_fail("a handle of another fd is accepted");
    check_all();
    hc.idr_reuse = false;
}

static void scenario_zeroing(void)
{
    proc_t *p = &procs[1];
    NvU64 a, b, c;
    int tag;

    // Forced non-zero roots: PMM says nothing is zero, so KVC must zero every new root.
    hc.pmm_zero_mode = HARNESS_ZERO_NEVER;
    range_add(p, AREA_BASE, UVM_PAGE_SIZE_2M);
    op_alloc(p, 0, UVM_PAGE_SIZE_64K, 0, 40);   // two roots, both zeroed (checked by op_alloc)
    check_all();
    a = p->pages[0].handle;
    b = p->pages[1].handle;
    expect("MAP", do_map(p, 0, UVM_KVC_MAP_FLAGS_NO_REPLACE, AREA_BASE, 1, &b), true);
    map_apply(p, 0, 0, (int[]){ 1 }, (NvU64[]){ AREA_BASE }, 1);
    check_all();
    // The process writes its data into b, unmaps and frees it; a keeps the root.
    if (!harness_gpu_access(gpus[0], tree_of(p, 0), AREA_BASE, true, p->va_space->id, &tag) || tag != 0)
        harness_fail("fresh page not zero on first GPU read");
    expect("UNMAP", do_unmap(p, 0, AREA_BASE, UVM_PAGE_SIZE_64K), true);
    model_unmap(p, 0, AREA_BASE, AREA_BASE + UVM_PAGE_SIZE_64K);
    expect("FREE", do_free(p, 0, 1, &b), true);
    p->pages[1].live = false;
    check_all();
    // Recycled without ZERO: its own old data (allowed); with ZERO: zeros.
    c = alloc_one(p, 0, UVM_PAGE_SIZE_64K, 0);
    expect("FREE", do_free(p, 0, 1, &c), true);
    p->pages[page_index(p, c)].live = false;
    c = alloc_one(p, 0, UVM_PAGE_SIZE_64K, UVM_KVC_ALLOC_FLAGS_ZERO);
    (void)a;
    hc.pmm_zero_mode = HARNESS_ZERO_RANDOM;
}

static void scenario_limits(void)
{
    proc_t *p = &procs[2], *q = &procs[1];
    NvU64 handles[80], h;
    int i;

    // Per process: 4 MiB = two roots on a GPU.
    harness_param_set("uvm_kvc_max_mb_per_process", 4);
    op_alloc(p, 1, UVM_PAGE_SIZE_64K, 0, 64);
    check_all();
    if (do_alloc(p, 1, UVM_PAGE_SIZE_64K, 0, 1, handles) != NV_ERR_INSUFFICIENT_RESOURCES)
        harness_fail("the per-process cap is not enforced");
    check_all();
    harness_param_set("uvm_kvc_max_mb_per_process", 0);

    // All processes on a GPU: q's next root would pass the GPU-wide cap.
    harness_param_set("uvm_kvc_max_gpu_percent", 0);
    if (do_alloc(q, 1, UVM_PAGE_SIZE_64K, 0, 1, handles) != NV_ERR_INSUFFICIENT_RESOURCES)
        harness_fail("the GPU-wide cap is not enforced");
    check_all();
    harness_param_set("uvm_kvc_max_gpu_percent", 100);

    // EVICT only when root allows it.
    if (do_alloc(q, 1, UVM_PAGE_SIZE_64K, UVM_KVC_ALLOC_FLAGS_EVICT, 1, handles) != NV_ERR_INSUFFICIENT_PERMISSIONS)
        harness_fail("EVICT allowed without uvm_kvc_allow_evict");
    harness_param_set("uvm_kvc_allow_evict", 1);
    expect("ALLOC EVICT", do_alloc(q, 1, UVM_PAGE_SIZE_64K, UVM_KVC_ALLOC_FLAGS_EVICT, 1, handles), true);
    page_add(q, handles[0], 1, 1);
    harness_param_set("uvm_kvc_allow_evict", 0);
    check_all();

    // Mappings per page: 16, then INSUFFICIENT_RESOURCES.
    range_add(p, AREA_BASE + 64 * UVM_PAGE_SIZE_2M, UVM_PAGE_SIZE_2M);
    h = p->pages[0].handle;
    for (i = 0; i < UVM_KVC_MAX_MAPPINGS_PER_PAGE; i++) {
        NvU64 va = AREA_BASE + 64 * UVM_PAGE_SIZE_2M + i * UVM_PAGE_SIZE_64K;

        expect("MAP alias", do_map(p, 1, 0, va, 1, &h), true);
        map_apply(p, 1, 0, (int[]){ 0 }, &va, 1);
    }
    if (do_map(p, 1, 0, AREA_BASE + 64 * UVM_PAGE_SIZE_2M + 20 * UVM_PAGE_SIZE_64K, 1, &h) != NV_ERR_INSUFFICIENT_RESOURCES)
        harness_fail("a page mapped more than UVM_KVC_MAX_MAPPINGS_PER_PAGE times");
    check_all();

    // Bookkeeping: with a 1 MiB cap, 6000 pages one per 2 MiB window (6000 blocks, 1.1 MB) are
    // refused, and nothing is mapped.
    {
        NvU64 base = AREA_BASE + 128 * UVM_PAGE_SIZE_2M;
        UVM_KVC_SCATTER_ENTRY *e = calloc(6000, sizeof(*e));
        int n = 0, first = p->npages;

        range_add(p, base, 6000 * UVM_PAGE_SIZE_2M);
        op_alloc(p, 1, UVM_PAGE_SIZE_64K, 0, 6000);
        check_all();
        harness_param_set("uvm_kvc_max_meta_mb_per_process", 1);
        for (i = first; i < p->npages; i++, n++) {
            e[n].va = base + (NvU64)n * UVM_PAGE_SIZE_2M;
            e[n].handle = p->pages[i].handle;
        }
        if (do_scatter(p, 1, 0, n, e) != NV_ERR_INSUFFICIENT_RESOURCES)
            harness_fail("the bookkeeping cap is not enforced");
        check_all();
        free(e);
    }
    harness_param_set("uvm_kvc_max_meta_mb_per_process", 256);
}

// GPU VA space unregister keeps the handles; GPU unregister ends them and returns the memory.
static void scenario_unregister(void)
{
    proc_t *p = &procs[0];
    int live_before = gpus[1]->live_chunks;

    range_add(p, AREA_BASE + 8 * UVM_PAGE_SIZE_2M, 2 * UVM_PAGE_SIZE_2M);
    op_alloc(p, 1, UVM_KVC_PAGE_SIZE_128K, 0, 8);
    check_all();
    op_scatter(p, 1);
    check_all();
    do_remove_gpu_va_space(p, 1);
    check_all();
    do_register_gpu(p, 1);
    op_map(p);
    check_all();
    do_unregister_gpu(p, 1);
    check_all();
    if (gpus[1]->live_chunks > live_before)
        harness_fail("GPU unregister left %d chunks", gpus[1]->live_chunks - live_before);
    do_register_gpu(p, 1);
    op_fork(p);
    op_fork(&procs[2]);
    check_all();
}

// --- phase 2: counts ---------------------------------------------------------------------------

typedef struct
{
    NvU64 pushes, waits, invalidates;
} counts_t;

static counts_t counts_now(void)
{
    counts_t c = { hc.pushes, hc.waits, hc.invalidates };

    return c;
}

static counts_t counts_since(counts_t before)
{
    counts_t c = { hc.pushes - before.pushes, hc.waits - before.waits, hc.invalidates - before.invalidates };

    return c;
}

typedef struct
{
    counts_t decode, decode_again, unmap_request, close;
    NvU64 mapped_pages, meta_bytes, blocks, roots;
    double meta_per_page;
} decode_result_t;

#define DECODE_REQUESTS 256
#define DECODE_REGIONS 64       // 32 layers x (K, V)
#define DECODE_PREFILL 5        // pages per region before the decode step

// A decode step of 256 requests x 64 regions (one range per region, a 2 MiB slot per request),
// each growing by one 64 KiB page: one MAP_SCATTER.
static decode_result_t scenario_decode(void)
{
    proc_t *p = &procs[0];
    NvU64 n = (NvU64)DECODE_REQUESTS * DECODE_REGIONS, i, step;
    NvU64 range_len = DECODE_REQUESTS * UVM_PAGE_SIZE_2M;
    UVM_KVC_SCATTER_ENTRY *e = calloc(n, sizeof(*e));
    NvU64 *handles = calloc(n, sizeof(NvU64));
    decode_result_t r = { 0 };
    counts_t before;
    int region;

    hc.pmm_zero_mode = HARNESS_ZERO_ALWAYS;
    for (region = 0; region < DECODE_REGIONS; region++)
        range_add(p, AREA_BASE + region * range_len, range_len);

    for (step = 0; step <= DECODE_PREFILL + 1; step++) {
        expect("ALLOC", do_alloc(p, 0, UVM_PAGE_SIZE_64K, 0, n, handles), true);
        for (i = 0; i < n; i++) {
            NvU64 region_base = AREA_BASE + (i % DECODE_REGIONS) * range_len + (i / DECODE_REGIONS) * UVM_PAGE_SIZE_2M;

            page_add(p, handles[i], 0, 1);
            e[i].va = region_base + step * UVM_PAGE_SIZE_64K;
            e[i].handle = handles[i];
        }
        before = counts_now();
        expect("MAP_SCATTER decode", do_scatter(p, 0, UVM_KVC_MAP_FLAGS_NO_REPLACE, n, e), true);
        if (step == DECODE_PREFILL)
            r.decode = counts_since(before);
        if (step == DECODE_PREFILL + 1)
            r.decode_again = counts_since(before);
        for (i = 0; i < n; i++) {
            NvU64 va = e[i].va;
            int pi = p->npages - (int)n + (int)i;

            map_apply(p, 0, 0, &pi, &va, 1);
        }
    }
    check_all();

    r.mapped_pages = n * (DECODE_PREFILL + 2);
    r.meta_bytes = (NvU64)atomic64_read(&kvc_of(p)->proc->meta_bytes);
    r.blocks = kvc_of(p)->gpus[1]->nblocks;
    r.roots = kvc_of(p)->gpus[1]->bytes / UVM_CHUNK_SIZE_MAX;
    r.meta_per_page = (double)r.meta_bytes / r.mapped_pages;

    // A finished request: one UNMAP per region (what pyvattn sends per contiguous run).
    before = counts_now();
    for (region = 0; region < DECODE_REGIONS; region++) {
        NvU64 base = AREA_BASE + region * range_len;

        expect("UNMAP", do_unmap(p, 0, base, UVM_PAGE_SIZE_2M), true);
        model_unmap(p, 0, base, base + UVM_PAGE_SIZE_2M);
    }
    r.unmap_request = counts_since(before);
    check_all();

    // fd close with everything mapped: per range one clear chain, one invalidate, one wait.
    before = counts_now();
    do_close(p);
    r.close = counts_since(before);
    proc_open(p, 0);
    check_all();
    hc.pmm_zero_mode = HARNESS_ZERO_RANDOM;
    free(e);
    free(handles);
    return r;
}

// --- phase 3: a failure at every fallible call -------------------------------------------------

// A short script touching every path; run again and again with the k-th fallible call failing.
static void script(void)
{
    proc_t *p = &procs[0], *q = &procs[2];
    int i;

    range_add(p, AREA_BASE, 2 * UVM_PAGE_SIZE_2M);
    range_add(p, AREA_BASE + 4 * UVM_PAGE_SIZE_2M, UVM_PAGE_SIZE_2M);
    op_alloc(p, 0, UVM_PAGE_SIZE_64K, 0, 40);
    check_all();
    op_alloc(p, 0, UVM_KVC_PAGE_SIZE_256K, UVM_KVC_ALLOC_FLAGS_ZERO, 4);
    check_all();
    for (i = 0; i < 6; i++) {
        op_map(p);
        check_all();
        op_scatter(p, 12);
        check_all();
        op_unmap(p);
        check_all();
        op_free(p);
        check_all();
        op_alloc(p, (int)rnd(NGPUS), page_sizes[rnd(3)], rnd(2) ? UVM_KVC_ALLOC_FLAGS_ZERO : 0, 1 + rnd(20));
        check_all();
    }
    op_create_range(q);
    check_all();
    op_alloc(q, 1, UVM_KVC_PAGE_SIZE_128K, 0, 3);
    check_all();
    op_scatter(q, 4);
    check_all();
    do_remove_gpu_va_space(p, 0);
    check_all();
    do_register_gpu(p, 0);
    op_scatter(p, 8);
    check_all();
    if (p->ranges[0].len)
        do_uvm_free(p, &p->ranges[0]);
    check_all();
}

static NvU64 replay_script(int kinds, NvU64 seed, NvU64 *leaked)
{
    NvU64 k;

    for (k = 1;; k++) {
        rng_state = seed;
        world_open();
        set_default_params();
        hfi.kinds = kinds;
        hfi.fail_at = (long)k;
        hfi.count = 0;
        hfi.hit = 0;
        hfi.ever_hit = 0;
        script();
        *leaked += world_close();
        if (!hfi.ever_hit)
            return k - 1;
    }
}

// --- phase 4: random operations ------------------------------------------------------------------

static void random_ops(NvU64 nops)
{
    NvU64 i;

    for (i = 0; i < nops; i++) {
        proc_t *p = &procs[rnd(NPROCS)];
        NvU64 op = rnd(100);

        as_proc(p);
        hfi.hit = 0;
        if (rnd(4) == 0) {
            hfi.kinds = HARNESS_FI_ALLOC | HARNESS_FI_USER;
            hfi.fail_at = hfi.count + 1 + (long)rnd(12);
        }
        if (op < 14)
            op_alloc(p, (int)rnd(NGPUS + 1), page_sizes[rnd(3)], rnd(3) ? 0 : UVM_KVC_ALLOC_FLAGS_ZERO, 1 + rnd(40));
        else if (op < 24)
            op_free(p);
        else if (op < 30)
            op_create_range(p);
        else if (op < 32) {
            m_range_t *r = some_range(p);

            if (r)
                do_uvm_free(p, r);
        }
        else if (op < 46)
            op_map(p);
        else if (op < 62)
            op_scatter(p, 16);
        else if (op < 74)
            op_unmap(p);
        else if (op < 86)
            op_access(p);
        else if (op < 90)
            op_query(p);
        else if (op < 93)
            op_fork(p);
        else if (op < 98)
            op_gpu_churn(p);
        else {
            int index = (int)(p - procs);

            do_close(p);
            proc_open(p, index);
        }
        hfi.kinds = 0;
        check_all();
    }
}

// --- phase 5: two threads in one process ----------------------------------------------------------

typedef struct
{
    proc_t view;
    NvU64 seed, ops;
    int index;
    pthread_t thread;
} thread_view_t;

// One thread of procs[0]: its own GPU, pages and half of the VA area; everything it does races
// with the other thread on the shared va_space, KVC state and process accounting.
static void *thread_ops(void *arg)
{
    thread_view_t *t = arg;
    proc_t *p = &t->view;
    NvU64 i;

    rng_state = t->seed;
    harness_current = &procs[0].task;
    harness_sched_enter(t->index);
    for (i = 0; i < t->ops; i++) {
        NvU64 op = rnd(100);
        m_range_t *r;

        if (op < 18)
            op_alloc(p, p->only_gpu, page_sizes[rnd(3)], rnd(3) ? 0 : UVM_KVC_ALLOC_FLAGS_ZERO, 1 + rnd(24));
        else if (op < 30)
            op_free(p);
        else if (op < 38)
            op_create_range(p);
        else if (op < 40 && (r = some_range(p)) != NULL)
            do_uvm_free(p, r);
        else if (op < 58)
            op_map(p);
        else if (op < 76)
            op_scatter(p, 12);
        else if (op < 90)
            op_unmap(p);
        else if (op < 96)
            op_access(p);
        else if (op < 98)
            op_query(p);
        else if (op < 99)
            do_remove_gpu_va_space(p, p->only_gpu);
        else
            do_register_gpu(p, p->only_gpu);
    }
    harness_sched_exit();
    return NULL;
}

// After the threads: the process's model is the union of their views (page indexes of the
// second view shifted), checked like any other operation's result.
static void merge_views(proc_t *p, thread_view_t *views, int n)
{
    int v, i, g, r = 0;
    NvU32 s;

    p->npages = 0;
    for (v = 0; v < n; v++) {
        proc_t *w = &views[v].view;
        int offset = p->npages;

        for (i = 0; i < w->npages; i++) {
            page_add(p, w->pages[i].handle, w->pages[i].gpu, w->pages[i].nslots);
            p->pages[p->npages - 1].live = w->pages[i].live;
            p->pages[p->npages - 1].ptes = w->pages[i].ptes;
        }
        g = w->only_gpu;
        for (s = 0; s < AREA_SLOTS; s++) {
            if (w->map[g][s])
                p->map[g][s] = w->map[g][s] + ((NvU32)offset << 4);
        }
        for (i = 0; i < MAX_RANGES; i++) {
            if (w->ranges[i].len)
                p->ranges[r++] = w->ranges[i];
        }
        p->gpu_va_space[g] = w->gpu_va_space[g];
        free(w->map[g]);
        free(w->pages);
    }
}

// Free-running (interleaving 0): whatever interleaving the machine gives. Else the threads take
// turns under the seeded scheduler (stubs.c), interleaving number `interleaving` of `seed`.
static void threads_phase(NvU64 seed, NvU64 ops, NvU64 interleaving)
{
    thread_view_t views[NGPUS];
    NvU64 schedule_seed = seed * 1000003 + interleaving;
    int v;

    memset(views, 0, sizeof(views));
    for (v = 0; v < NGPUS; v++) {
        proc_t *w = &views[v].view;

        *w = procs[0];
        w->pages = NULL;
        w->npages = w->cap_pages = 0;
        memset(w->ranges, 0, sizeof(w->ranges));
        memset(w->map, 0, sizeof(w->map));
        w->map[v] = calloc(AREA_SLOTS, sizeof(NvU32));
        w->only_gpu = v;
        w->area_first = v * (AREA_SLOTS / 32 / NGPUS);
        w->area_slots = AREA_SLOTS / 32 / NGPUS;
        // Interleavings of one seed also differ in their operations (not shared with other seeds').
        views[v].seed = interleaving ? schedule_seed * 0x9e3779b97f4a7c15ULL + v : seed * 31 + v;
        views[v].ops = ops;
        views[v].index = v;
    }
    hfi.kinds = 0;
    if (interleaving)
        harness_sched_start(NGPUS, schedule_seed, false);
    for (v = 0; v < NGPUS; v++)
        pthread_create(&views[v].thread, NULL, thread_ops, &views[v]);
    for (v = 0; v < NGPUS; v++)
        pthread_join(views[v].thread, NULL);
    harness_sched_stop();
    harness_current = &procs[0].task;
    merge_views(&procs[0], views, NGPUS);
    check_all();
}

// Phase 5, one interleaving on purpose (the adversarial scheduler, no draw): thread 1 maps a page
// of GPU1's first chunk again and again while thread 0 allocates and frees a page of GPU0's
// first chunk. Both chunks have the same physical address, each on its own GPU; thread 1 is
// stopped at every lock release while its PTE write is queued, and thread 0 goes through whole
// ioctls meanwhile, so GPU0's chunk goes back to PMM while GPU1's PTE write to "the same"
// address is pending. That is fine, and the model must say so: its check that no queued
// operation writes a freed chunk once ignored which GPU the operation was for, and failed
// phase 5 now and then under load.
#define SAME_ADDRESS_ROUNDS 4

typedef struct
{
    int index;
    NvU64 handle;
    pthread_t thread;
} same_address_t;

static bool same_address_done;

static void *same_address_thread(void *arg)
{
    same_address_t *t = arg;
    proc_t *p = &procs[0];
    NvU64 base = AREA_BASE, h;
    int r;

    rng_state = (NvU64)t->index;
    harness_current = &p->task;
    harness_sched_enter(t->index);
    if (t->index == 0) {
        // Only one thread runs at a time: the flag is read and written in one order.
        for (r = 0; !same_address_done && r < 10000; r++) {
            expect("ALLOC", do_alloc(p, 0, UVM_PAGE_SIZE_64K, 0, 1, &h), true);
            expect("FREE", do_free(p, 0, 1, &h), true);
        }
    }
    else {
        expect("ALLOC", do_alloc(p, 1, UVM_PAGE_SIZE_64K, 0, 1, &t->handle), true);
        for (r = 0; r < SAME_ADDRESS_ROUNDS; r++) {
            expect("MAP", do_map(p, 1, 0, base, 1, &t->handle), true);
            expect("UNMAP", do_unmap(p, 1, base, UVM_PAGE_SIZE_64K), true);
        }
        same_address_done = true;
    }
    harness_sched_exit();
    return NULL;
}

static void scenario_same_address(void)
{
    same_address_t t[NGPUS];
    m_range_t range = { AREA_BASE, UVM_PAGE_SIZE_2M };
    proc_t *p = &procs[0];
    int v;

    // PMM's chunks come zeroed: no zeroing push of thread 0's own, and one interleaving whatever
    // the seed.
    hc.pmm_zero_mode = HARNESS_ZERO_ALWAYS;
    same_address_done = false;
    range_add(p, range.base, range.len);
    memset(t, 0, sizeof(t));
    harness_sched_start(NGPUS, 0, true);
    for (v = 0; v < NGPUS; v++) {
        t[v].index = v;
        pthread_create(&t[v].thread, NULL, same_address_thread, &t[v]);
    }
    for (v = 0; v < NGPUS; v++)
        pthread_join(t[v].thread, NULL);
    harness_sched_stop();
    harness_current = &p->task;
    expect("FREE", do_free(p, 0, 1, &t[1].handle), true);
    do_uvm_free(p, &p->ranges[0]);
    check_all();
}

int main(int argc, char **argv)
{
    NvU64 seed = 12648430, nops = 2500, fi_alloc = 0, fi_gpu = 0, leaked = 0, interleavings = HARNESS_INTERLEAVINGS, k;
    decode_result_t d = { 0 };
    const char *env = getenv("HARNESS_OPS"), *env_seed = getenv("HARNESS_SEED");
    const char *env_il = getenv("HARNESS_INTERLEAVINGS");
    time_t t0 = time(NULL);
    bool threads_only = false;
    int i;

    for (i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--seed") && i + 1 < argc)
            seed = strtoull(argv[++i], NULL, 0);
        else if (!strcmp(argv[i], "--ops") && i + 1 < argc)
            nops = strtoull(argv[++i], NULL, 0);
        else if (!strcmp(argv[i], "--interleavings") && i + 1 < argc)
            interleavings = strtoull(argv[++i], NULL, 0);
        else if (!strcmp(argv[i], "--threads-only"))
            threads_only = true;
        else if (!strcmp(argv[i], "--verbose"))
            hc.verbose = 1;
        else {
            fprintf(stderr, "usage: %s [--seed N] [--ops N] [--interleavings N] [--threads-only] [--verbose]\n", argv[0]);
            return 2;
        }
    }
    if (env && *env)
        nops = strtoull(env, NULL, 0);
    if (env_seed && *env_seed)
        seed = strtoull(env_seed, NULL, 0);
    if (env_il && *env_il)
        interleavings = strtoull(env_il, NULL, 0);
    setvbuf(stdout, NULL, _IOLBF, 0);
    hc.seed = seed;
    rng_state = seed;
    kv_baseline = hc.kv_bytes;

    if (threads_only)
        goto threads;

    world_open();
    set_default_params();
    scenario_generations();
    scenario_zeroing();
    scenario_limits();
    scenario_unregister();
    leaked += world_close();
    printf("driver-harness: scenarios passed (generations and id reuse, forced non-zero roots, limits, fork, unregister)\n");

    world_open();
    set_default_params();
    d = scenario_decode();
    leaked += world_close();
    printf("driver-harness: decode step of %d requests x %d regions (%d pages) = 1 MAP_SCATTER: %llu pushes, %llu TLB invalidate, %llu wait "
           "(again: %llu, %llu, %llu)\n", DECODE_REQUESTS, DECODE_REGIONS, DECODE_REQUESTS * DECODE_REGIONS,
           (unsigned long long)d.decode.pushes, (unsigned long long)d.decode.invalidates, (unsigned long long)d.decode.waits,
           (unsigned long long)d.decode_again.pushes, (unsigned long long)d.decode_again.invalidates,
           (unsigned long long)d.decode_again.waits);
    printf("driver-harness: bookkeeping %.1f bytes per mapped 64 KiB page (%llu pages, %llu roots, %llu blocks, %llu bytes); "
           "a finished request (%d UNMAPs): %llu waits; fd close: %llu waits, %llu invalidates for %d ranges\n",
           d.meta_per_page, (unsigned long long)d.mapped_pages, (unsigned long long)d.roots, (unsigned long long)d.blocks,
           (unsigned long long)d.meta_bytes, DECODE_REGIONS, (unsigned long long)d.unmap_request.waits,
           (unsigned long long)d.close.waits, (unsigned long long)d.close.invalidates, DECODE_REGIONS);
    if (d.decode.invalidates != 1 || d.decode.waits != 1 || d.decode_again.invalidates != 1 || d.decode_again.waits != 1)
        harness_fail("a decode step is not one invalidate and one wait");
    if (d.meta_per_page > 64)
        harness_fail("bookkeeping above 64 bytes per mapped page");
    if (d.close.waits > 3 * DECODE_REGIONS + 4)
        harness_fail("fd close is not O(ranges) waits");

    fi_alloc = replay_script(HARNESS_FI_ALLOC | HARNESS_FI_USER, seed, &leaked);
    fi_gpu = replay_script(HARNESS_FI_GPU, seed, &leaked);
    printf("driver-harness: failure injected at each of %llu allocation/user-copy calls and %llu GPU calls of the script: "
           "all or nothing, clean teardown (%llu roots kept out of PMM after GPU errors)\n",
           (unsigned long long)fi_alloc, (unsigned long long)fi_gpu, (unsigned long long)leaked);

    world_open();
    set_default_params();
    random_ops(nops);
    world_close();

threads:
    world_open();
    set_default_params();
    threads_phase(seed, nops / 2, 0);
    world_close();
    printf("driver-harness: two threads of one process, one per GPU, %llu ops each on the shared va_space: "
           "no deadlock, lock order kept, state equal to the union of their models\n", (unsigned long long)(nops / 2));
    // The same, in interleavings the machine would rarely give: taking turns at seeded lock
    // releases, reproducible from the seed and the interleaving's number. First the one that
    // once failed by chance.
    world_open();
    set_default_params();
    scenario_same_address();
    world_close();
    for (k = 1; k <= interleavings; k++) {
        hc.interleaving = k;
        world_open();
        set_default_params();
        threads_phase(seed, HARNESS_INTERLEAVING_OPS, k);
        world_close();
    }
    hc.interleaving = 0;
    printf("driver-harness: the two threads taking turns at lock releases: a chunk freed on one GPU while a PTE write to the same "
           "address is queued on the other; %llu seeded interleavings of %d ops each: same checks\n",
           (unsigned long long)interleavings, HARNESS_INTERLEAVING_OPS);
    if (threads_only) {
        printf("driver-harness: OK: seed %llu, the two-thread phase only; %lds\n", (unsigned long long)seed, (long)(time(NULL) - t0));
        return 0;
    }
    printf("driver-harness: OK: seed %llu, %llu random ops on %d processes x %d GPUs (every ioctl, UVM_FREE, GPU VA space and GPU "
           "unregister, fd close, fork), %llu + %llu failure points, two threads (free-running and 1 + %llu scheduled interleavings), "
           "lock order, PTEs, TLB, refs, zeroing and accounting checked after every op; decode step 1 ioctl/1 invalidate/1 wait, "
           "%.1f B/page; %lds\n",
           (unsigned long long)seed, (unsigned long long)nops, NPROCS, NGPUS, (unsigned long long)fi_alloc,
           (unsigned long long)fi_gpu, (unsigned long long)interleavings, d.meta_per_page, (long)(time(NULL) - t0));
    return 0;
}

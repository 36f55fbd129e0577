/*
 * uvm_kvc.c: fd-owned 64 KiB GPU pages for nvidia-uvm (see uvm_kvc.h and
 * shared/research/uvm-driver-design-memo.md section 4).
 *
 * Rules followed throughout:
 *  - every user-supplied field is validated before any side effect; batches are all or nothing;
 *  - user memory is copied in before and out after the va_space lock (no page fault under it);
 *  - memory is zeroed (CE memset, waited on) before a handle to it is returned;
 *  - UVM_ASSERT only for internal invariants; user-triggerable failures log with
 *    UVM_DBG_PRINT_RL only;
 *  - nothing here changes what happens to any va_space that never calls these ioctls:
 *    va_space->kvc stays NULL and every hook returns at once.
 */

#include "uvm_kvc.h"
#include "uvm_api.h"
#include "uvm_gpu.h"
#include "uvm_hal.h"
#include "uvm_lock.h"
#include "uvm_mmu.h"
#include "uvm_pmm_gpu.h"
#include "uvm_push.h"
#include "uvm_tracker.h"
#include "uvm_test_ioctl.h"
#include "uvm_kvmalloc.h"
#include "uvm_va_space_mm.h"

#include <linux/idr.h>
#include <linux/sort.h>
#include <linux/uaccess.h>

#define KVC_SLOT_SIZE       UVM_PAGE_SIZE_64K
#define KVC_ROOT_SIZE       UVM_CHUNK_SIZE_MAX
#define KVC_SLOTS_PER_ROOT  (KVC_ROOT_SIZE / KVC_SLOT_SIZE)

/* Memsets per zeroing push: a push holds at most UVM_MAX_PUSH_SIZE of methods, and one CE memset
 * takes well under 256 bytes on every architecture, so 64 stay far inside it. */
#define KVC_ZERO_PER_PUSH   64

static unsigned uvm_kvc_max_mb_per_va_space = 0;
module_param(uvm_kvc_max_mb_per_va_space, uint, S_IRUGO);
MODULE_PARM_DESC(uvm_kvc_max_mb_per_va_space,
                 "KVC pages: most MiB of GPU memory one va_space (fd) may hold, per GPU; 0 = no limit");

/* A 2 MiB KERNEL-type PMM root split into 32 slots of 64 KiB by the pool itself. */
typedef struct
{
    struct list_head node;
    uvm_gpu_chunk_t *chunk;
    NvU32 used;     /* slot bitmap */
    NvU32 dirty;    /* slots that held data of this va_space since the root was zeroed */
} uvm_kvc_root_t;

/* One handle: 1, 2 or 4 consecutive slots of a root. */
typedef struct uvm_kvc_page_struct
{
    NvU64 handle;
    struct uvm_kvc_va_space_struct *kvc;
    uvm_gpu_t *gpu;
    uvm_kvc_root_t *root;
    NvU32 slot;
    NvU32 nslots;
    NvU64 refs;         /* number of 64 KiB PTEs mapping this page */
    bool in_table;      /* the handle is still valid (not freed) */
    bool marked;        /* scratch for duplicate detection under the lock */
    bool needs_zero;    /* ALLOC scratch: a recycled slot to re-zero before publishing */
} uvm_kvc_page_t;

typedef struct
{
    struct list_head roots;
    NvU64 bytes;        /* bytes of roots held */
} uvm_kvc_pool_t;

typedef struct uvm_kvc_va_space_struct
{
    /* Protects everything below. Order UVM_LOCK_ORDER_KVC. */
    uvm_mutex_t lock;
    struct idr ids;
    NvU32 gen;
    uvm_kvc_pool_t pools[UVM_ID_MAX_GPUS];
} uvm_kvc_va_space_t;

static bool kvc_page_size_valid(NvU64 page_size)
{
    return page_size == UVM_KVC_PAGE_SIZE_64K ||
           page_size == UVM_KVC_PAGE_SIZE_128K ||
           page_size == UVM_KVC_PAGE_SIZE_256K;
}

static uvm_kvc_pool_t *kvc_pool(uvm_kvc_va_space_t *kvc, uvm_gpu_t *gpu)
{
    return &kvc->pools[uvm_id_gpu_index(gpu->id)];
}

static NvU64 kvc_page_phys(const uvm_kvc_page_t *page, NvU32 sub)
{
    return page->root->chunk->address + (NvU64)(page->slot + sub) * KVC_SLOT_SIZE;
}

static NvU32 kvc_slot_mask(NvU32 slot, NvU32 nslots)
{
    return (NvU32)(((1ULL << nslots) - 1) << slot);
}

/* The va_space's KVC state, created on first use. NULL only on allocation failure. */
static uvm_kvc_va_space_t *kvc_get_or_create(uvm_va_space_t *va_space)
{
    uvm_kvc_va_space_t *kvc = READ_ONCE(va_space->kvc);
    size_t i;

    if (kvc)
        return kvc;

    kvc = uvm_kvmalloc_zero(sizeof(*kvc));
    if (!kvc)
        return NULL;

    uvm_mutex_init(&kvc->lock, UVM_LOCK_ORDER_KVC);
    idr_init(&kvc->ids);
    for (i = 0; i < ARRAY_SIZE(kvc->pools); i++)
        INIT_LIST_HEAD(&kvc->pools[i].roots);

    if (cmpxchg(&va_space->kvc, NULL, kvc) != NULL) {
        idr_destroy(&kvc->ids);
        uvm_kvfree(kvc);
    }

    return READ_ONCE(va_space->kvc);
}

/* GPUs the feature refuses: no 64K big pages in this GPU VA space, no sparse (pre-Pascal),
 * confidential computing, and SR-IOV heavy virtualization (there the guest's page tables are
 * not where vidmem PTEs written by physical address would be honoured). */
static NV_STATUS kvc_gpu_supported(uvm_va_space_t *va_space, uvm_gpu_t *gpu)
{
    uvm_gpu_va_space_t *gpu_va_space = uvm_gpu_va_space_get(va_space, gpu);

    if (uvm_kvc_conf_computing_enabled(gpu))
        return NV_ERR_NOT_SUPPORTED;
    if (uvm_kvc_sriov_heavy(gpu))
        return NV_ERR_NOT_SUPPORTED;
    if (!gpu->parent->sparse_mappings_supported)
        return NV_ERR_NOT_SUPPORTED;
    if (gpu_va_space && gpu_va_space->page_tables.big_page_size != UVM_PAGE_SIZE_64K)
        return NV_ERR_NOT_SUPPORTED;
    return NV_OK;
}

/* Under the va_space lock: the GPU named by uuid, with a GPU VA space, supported. */
static NV_STATUS kvc_get_gpu(uvm_va_space_t *va_space, const NvProcessorUuid *uuid, uvm_gpu_t **out)
{
    uvm_gpu_t *gpu = uvm_va_space_get_gpu_by_uuid_with_gpu_va_space(va_space, uuid);
    NV_STATUS status;

    if (!gpu)
        return NV_ERR_INVALID_DEVICE;
    status = kvc_gpu_supported(va_space, gpu);
    if (status != NV_OK)
        return status;
    *out = gpu;
    return NV_OK;
}

/* One CE memset in `push`, with no membar of its own, as stock UVM zeroes new chunks
 * (block_zero_new_gpu_chunk): the release of the push's tracking semaphore at uvm_push_end()
 * always comes with a membar sys, and every zeroing push is waited on before a handle to the
 * memory is returned, so the zeroes are visible to every engine before anyone can map them. */
static void kvc_zero(uvm_gpu_t *gpu, NvU64 phys, NvU64 size, uvm_push_t *push)
{
    uvm_gpu_address_t addr = uvm_gpu_address_copy(gpu, uvm_gpu_phys_address(UVM_APERTURE_VID, phys));

    uvm_push_set_flag(push, UVM_PUSH_FLAG_CE_NEXT_PIPELINED);
    uvm_push_set_flag(push, UVM_PUSH_FLAG_NEXT_MEMBAR_NONE);
    gpu->parent->ce_hal->memset_8(push, addr, 0, size);
}

/* No KVC lock held (a push is taken below the KVC lock and never held across it). Zeroes the
 * pages marked needs_zero, in pushes of at most KVC_ZERO_PER_PUSH memsets, and waits for all of
 * them. The pages belong to an ALLOC call and are not published yet: nobody else can reach them,
 * and their roots cannot go away (their slots are marked used). */
static NV_STATUS kvc_zero_pages(uvm_gpu_t *gpu, uvm_kvc_page_t **pages, NvU64 count)
{
    uvm_tracker_t tracker = UVM_TRACKER_INIT();
    NV_STATUS status = NV_OK, wait_status;
    uvm_push_t push;
    NvU64 i = 0, first;
    NvU32 n, k;

    while (status == NV_OK) {
        /* The next (at most) KVC_ZERO_PER_PUSH pages to zero start at `first`. */
        for (first = i, n = 0; i < count && n < KVC_ZERO_PER_PUSH; i++)
            n += pages[i]->needs_zero;
        if (n == 0)
            break;

        status = uvm_push_begin(gpu->channel_manager, UVM_CHANNEL_TYPE_GPU_INTERNAL, &push,
                                "KVC zero %u pages", n);
        if (status != NV_OK)
            break;
        for (k = 0; k < n; first++) {
            uvm_kvc_page_t *page = pages[first];

            if (!page->needs_zero)
                continue;
            kvc_zero(gpu, kvc_page_phys(page, 0), (NvU64)page->nslots * KVC_SLOT_SIZE, &push);
            k++;
        }
        uvm_push_end(&push);
        /* On failure to track the push, this waits for it itself: nothing is left running. */
        status = uvm_tracker_add_push_safe(&tracker, &push);
    }

    wait_status = uvm_tracker_wait_deinit(&tracker);
    return status != NV_OK ? status : wait_status;
}

/* Called without the KVC lock: a new zeroed root (the memset is complete on return). */
static NV_STATUS kvc_root_alloc(uvm_gpu_t *gpu, NvU32 flags, uvm_kvc_root_t **out)
{
    uvm_kvc_root_t *root;
    uvm_push_t push;
    NV_STATUS status;
    uvm_pmm_alloc_flags_t pmm_flags = UVM_PMM_ALLOC_FLAGS_NONE;

    if (flags & UVM_KVC_ALLOC_FLAGS_EVICT)
        pmm_flags |= UVM_PMM_ALLOC_FLAGS_EVICT;

    root = uvm_kvmalloc_zero(sizeof(*root));
    if (!root)
        return NV_ERR_NO_MEMORY;

    status = uvm_pmm_gpu_alloc_kernel(&gpu->pmm, 1, KVC_ROOT_SIZE, pmm_flags, &root->chunk, NULL);
    if (status != NV_OK) {
        uvm_kvfree(root);
        return status;
    }

    if (!root->chunk->is_zero) {
        status = uvm_push_begin(gpu->channel_manager,
                                UVM_CHANNEL_TYPE_GPU_INTERNAL,
                                &push,
                                "KVC zero root 0x%llx",
                                root->chunk->address);
        if (status == NV_OK) {
            kvc_zero(gpu, root->chunk->address, KVC_ROOT_SIZE, &push);
            status = uvm_push_end_and_wait(&push);
        }
        if (status != NV_OK) {
            uvm_pmm_gpu_free(&gpu->pmm, root->chunk, NULL);
            uvm_kvfree(root);
            return status;
        }
    }

    INIT_LIST_HEAD(&root->node);
    *out = root;
    return NV_OK;
}

/* KVC lock held. Releases the slots of a page that is neither in the table nor mapped; an empty
 * root goes back to PMM. */
static void kvc_page_destroy_locked(uvm_kvc_va_space_t *kvc, uvm_kvc_page_t *page)
{
    uvm_kvc_root_t *root = page->root;
    NvU32 mask = kvc_slot_mask(page->slot, page->nslots);

    uvm_assert_mutex_locked(&kvc->lock);
    UVM_ASSERT(!page->in_table);
    UVM_ASSERT(page->refs == 0);
    UVM_ASSERT((root->used & mask) == mask);

    root->used &= ~mask;
    root->dirty |= mask;
    if (root->used == 0) {
        uvm_kvc_pool_t *pool = kvc_pool(kvc, page->gpu);

        list_del(&root->node);
        pool->bytes -= KVC_ROOT_SIZE;
        /* No pending work: PTEs pointing here were cleared and waited on, and the zeroing push
         * was waited on. */
        uvm_pmm_gpu_free(&page->gpu->pmm, root->chunk, NULL);
        uvm_kvfree(root);
    }
    uvm_kvfree(page);
}

/* KVC lock held: an aligned run of nslots free slots in some root of the pool, or NULL. */
static uvm_kvc_root_t *kvc_find_slots_locked(uvm_kvc_pool_t *pool, NvU32 nslots, NvU32 *slot)
{
    uvm_kvc_root_t *root;
    NvU32 i;

    list_for_each_entry(root, &pool->roots, node) {
        if (root->used == ~(NvU32)0)
            continue;
        for (i = 0; i < KVC_SLOTS_PER_ROOT; i += nslots) {
            if (!(root->used & kvc_slot_mask(i, nslots))) {
                *slot = i;
                return root;
            }
        }
    }
    return NULL;
}

/* KVC lock held: the page of a handle if it is valid in this va_space. */
static uvm_kvc_page_t *kvc_lookup_locked(uvm_kvc_va_space_t *kvc, NvU64 handle)
{
    NvU64 id = handle & 0xffffffffULL;
    uvm_kvc_page_t *page;

    uvm_assert_mutex_locked(&kvc->lock);

    if (id == 0 || id > INT_MAX)
        return NULL;
    page = idr_find(&kvc->ids, (unsigned long)id);
    if (!page || page->handle != handle || !page->in_table)
        return NULL;
    return page;
}

/* KVC lock held: drop `n` PTE references. */
static void kvc_page_put_locked(uvm_kvc_va_space_t *kvc, uvm_kvc_page_t *page, NvU64 n)
{
    UVM_ASSERT(page->refs >= n);
    page->refs -= n;
    if (page->refs == 0 && !page->in_table)
        kvc_page_destroy_locked(kvc, page);
}

static NV_STATUS kvc_check_header(NvU32 version, NvU32 flags, NvU32 allowed_flags, NvU32 pad0)
{
    if (version != UVM_KVC_ABI_VERSION)
        return NV_ERR_NOT_SUPPORTED;
    if (flags & ~allowed_flags)
        return NV_ERR_INVALID_FLAGS;
    if (pad0 != 0)
        return NV_ERR_INVALID_ARGUMENT;
    return NV_OK;
}

static NV_STATUS kvc_count_valid(NvU64 count)
{
    if (count == 0)
        return NV_ERR_INVALID_ARGUMENT;
    if (count > UVM_KVC_MAX_BATCH)
        return NV_ERR_INVALID_LIMIT;
    return NV_OK;
}

/* ---------------------------------------------------------------------------------------------
 * ALLOC
 */

NV_STATUS uvm_kvc_alloc_pages(uvm_va_space_t *va_space,
                              uvm_gpu_t *gpu,
                              NvU64 page_size,
                              NvU32 flags,
                              NvU64 count,
                              NvU64 *handles)
{
    uvm_kvc_va_space_t *kvc;
    uvm_kvc_pool_t *pool;
    uvm_kvc_page_t **pages;
    uvm_kvc_root_t *spare = NULL;
    NvU32 nslots = (NvU32)(page_size / KVC_SLOT_SIZE);
    NvU64 i, done = 0, quota;
    NV_STATUS status = NV_OK;

    uvm_assert_rwsem_locked(&va_space->lock);
    UVM_ASSERT(kvc_page_size_valid(page_size));
    UVM_ASSERT(count > 0 && count <= UVM_KVC_MAX_BATCH);

    kvc = kvc_get_or_create(va_space);
    if (!kvc)
        return NV_ERR_NO_MEMORY;

    pages = uvm_kvmalloc_zero(count * sizeof(*pages));
    if (!pages)
        return NV_ERR_NO_MEMORY;

    for (i = 0; i < count; i++) {
        pages[i] = uvm_kvmalloc_zero(sizeof(*pages[i]));
        if (!pages[i]) {
            status = NV_ERR_NO_MEMORY;
            goto out_free_structs;
        }
    }

    pool = kvc_pool(kvc, gpu);
    quota = (NvU64)uvm_kvc_max_mb_per_va_space << 20;

    uvm_mutex_lock(&kvc->lock);
    while (done < count) {
        uvm_kvc_page_t *page = pages[done];
        uvm_kvc_root_t *root;
        NvU32 slot = 0;
        NvU32 mask;

        root = kvc_find_slots_locked(pool, nslots, &slot);
        if (!root) {
            if (!spare) {
                if (quota && pool->bytes + KVC_ROOT_SIZE > quota) {
                    status = NV_ERR_INSUFFICIENT_RESOURCES;
                    break;
                }
                /* PMM allocation (possibly evicting) and zeroing happen without the KVC lock. */
                uvm_mutex_unlock(&kvc->lock);
                status = kvc_root_alloc(gpu, flags, &spare);
                uvm_mutex_lock(&kvc->lock);
                if (status != NV_OK)
                    break;
                continue;
            }
            if (quota && pool->bytes + KVC_ROOT_SIZE > quota) {
                status = NV_ERR_INSUFFICIENT_RESOURCES;
                break;
            }
            list_add_tail(&spare->node, &pool->roots);
            pool->bytes += KVC_ROOT_SIZE;
            spare = NULL;
            continue;
        }

        mask = kvc_slot_mask(slot, nslots);
        root->used |= mask;
        page->kvc = kvc;
        page->gpu = gpu;
        page->root = root;
        page->slot = slot;
        page->nslots = nslots;
        /* Recycled slots held this va_space's own data (a new root is zeroed before it joins
         * the pool): re-zeroed only on request, after the loop, without the KVC lock. A failed
         * call marks the slots dirty again when it gives them back. */
        page->needs_zero = (flags & UVM_KVC_ALLOC_FLAGS_ZERO) && (root->dirty & mask);
        root->dirty &= ~mask;
        done++;
    }
    uvm_mutex_unlock(&kvc->lock);

    if (status == NV_OK)
        status = kvc_zero_pages(gpu, pages, done);

    uvm_mutex_lock(&kvc->lock);
    if (status == NV_OK) {
        /* Publish every handle, or none. */
        for (i = 0; i < count; i++) {
            int id = idr_alloc_cyclic(&kvc->ids, pages[i], 1, INT_MAX, NV_UVM_GFP_FLAGS);
            if (id < 0) {
                status = NV_ERR_NO_MEMORY;
                break;
            }
            if (++kvc->gen == 0)
                kvc->gen = 1;
            pages[i]->handle = ((NvU64)kvc->gen << 32) | (NvU64)id;
            pages[i]->in_table = true;
        }
        if (status != NV_OK) {
            while (i-- > 0) {
                idr_remove(&kvc->ids, (unsigned long)(pages[i]->handle & 0xffffffffULL));
                pages[i]->in_table = false;
            }
        }
    }

    if (status != NV_OK) {
        /* Give back the slots taken so far (and with them any root that became empty). */
        for (i = 0; i < done; i++) {
            kvc_page_destroy_locked(kvc, pages[i]);
            pages[i] = NULL;
        }
    }
    else {
        for (i = 0; i < count; i++)
            handles[i] = pages[i]->handle;
    }
    if (spare) {
        uvm_pmm_gpu_free(&gpu->pmm, spare->chunk, NULL);
        uvm_kvfree(spare);
    }
    uvm_mutex_unlock(&kvc->lock);

    if (status == NV_OK) {
        uvm_kvfree(pages);
        return NV_OK;
    }

out_free_structs:
    for (i = done; i < count; i++)
        uvm_kvfree(pages[i]);
    uvm_kvfree(pages);
    return status;
}

NV_STATUS uvm_api_kvc_alloc(UVM_KVC_ALLOC_PARAMS *params, struct file *filp)
{
    uvm_va_space_t *va_space = uvm_va_space_get(filp);
    NvU64 *handles;
    uvm_gpu_t *gpu;
    NV_STATUS status;

    params->countDone = 0;
    status = kvc_check_header(params->version,
                              params->flags,
                              UVM_KVC_ALLOC_FLAGS_EVICT | UVM_KVC_ALLOC_FLAGS_ZERO,
                              params->pad0);
    if (status != NV_OK)
        return status;
    if (params->reserved != 0 || !kvc_page_size_valid(params->pageSize) || params->handlesPtr == 0)
        return NV_ERR_INVALID_ARGUMENT;
    status = kvc_count_valid(params->count);
    if (status != NV_OK)
        return status;

    handles = uvm_kvmalloc(params->count * sizeof(*handles));
    if (!handles)
        return NV_ERR_NO_MEMORY;

    uvm_va_space_down_read(va_space);
    status = kvc_get_gpu(va_space, &params->gpuUuid, &gpu);
    if (status == NV_OK)
        status = uvm_kvc_alloc_pages(va_space, gpu, params->pageSize, params->flags, params->count, handles);
    uvm_va_space_up_read(va_space);

    if (status == NV_OK) {
        if (copy_to_user((void __user *)(uintptr_t)params->handlesPtr, handles, params->count * sizeof(*handles))) {
            /* Nobody learnt these handles: take them back. */
            uvm_va_space_down_read(va_space);
            (void)uvm_kvc_free_pages(va_space, 0, params->count, handles);
            uvm_va_space_up_read(va_space);
            status = NV_ERR_INVALID_ADDRESS;
        }
        else {
            params->countDone = params->count;
        }
    }
    else {
        UVM_DBG_PRINT_RL("KVC alloc of %llu x 0x%llx failed: %s\n",
                         params->count, params->pageSize, nvstatusToString(status));
    }

    uvm_kvfree(handles);
    return status;
}

/* ---------------------------------------------------------------------------------------------
 * FREE
 */

NV_STATUS uvm_kvc_free_pages(uvm_va_space_t *va_space, NvU32 flags, NvU64 count, const NvU64 *handles)
{
    uvm_kvc_va_space_t *kvc = READ_ONCE(va_space->kvc);
    NV_STATUS status = NV_OK;
    NvU64 i, checked = 0;

    uvm_assert_rwsem_locked(&va_space->lock);

    if (!kvc)
        return NV_ERR_INVALID_OBJECT_HANDLE;

    uvm_mutex_lock(&kvc->lock);

    /* Validate every handle first: unknown, duplicate or (FAIL_IF_MAPPED) mapped fails and
     * nothing is freed. */
    for (i = 0; i < count; i++) {
        uvm_kvc_page_t *page = kvc_lookup_locked(kvc, handles[i]);

        if (!page) {
            status = NV_ERR_INVALID_OBJECT_HANDLE;
            break;
        }
        if (page->marked) {
            status = NV_ERR_INVALID_ARGUMENT;
            break;
        }
        if ((flags & UVM_KVC_FREE_FLAGS_FAIL_IF_MAPPED) && page->refs) {
            status = NV_ERR_IN_USE;
            break;
        }
        page->marked = true;
        checked++;
    }

    for (i = 0; i < checked; i++) {
        uvm_kvc_page_t *page = kvc_lookup_locked(kvc, handles[i]);

        UVM_ASSERT(page);
        page->marked = false;
        if (status != NV_OK)
            continue;

        idr_remove(&kvc->ids, (unsigned long)(page->handle & 0xffffffffULL));
        page->in_table = false;
        /* A mapped page lives on until its last PTE goes away. */
        if (page->refs == 0)
            kvc_page_destroy_locked(kvc, page);
    }

    uvm_mutex_unlock(&kvc->lock);
    return status;
}

NV_STATUS uvm_api_kvc_free(UVM_KVC_FREE_PARAMS *params, struct file *filp)
{
    uvm_va_space_t *va_space = uvm_va_space_get(filp);
    NvU64 *handles;
    NV_STATUS status;

    params->countDone = 0;
    status = kvc_check_header(params->version, params->flags, UVM_KVC_FREE_FLAGS_FAIL_IF_MAPPED, params->pad0);
    if (status != NV_OK)
        return status;
    if (params->reserved != 0 || params->handlesPtr == 0)
        return NV_ERR_INVALID_ARGUMENT;
    status = kvc_count_valid(params->count);
    if (status != NV_OK)
        return status;

    handles = uvm_kvmalloc(params->count * sizeof(*handles));
    if (!handles)
        return NV_ERR_NO_MEMORY;
    if (copy_from_user(handles, (const void __user *)(uintptr_t)params->handlesPtr, params->count * sizeof(*handles))) {
        uvm_kvfree(handles);
        return NV_ERR_INVALID_ADDRESS;
    }

    uvm_va_space_down_read(va_space);
    status = uvm_kvc_free_pages(va_space, params->flags, params->count, handles);
    uvm_va_space_up_read(va_space);

    if (status == NV_OK)
        params->countDone = params->count;
    else
        UVM_DBG_PRINT_RL("KVC free of %llu handles failed: %s\n", params->count, nvstatusToString(status));

    uvm_kvfree(handles);
    return status;
}

/* ---------------------------------------------------------------------------------------------
 * CREATE_RANGE
 */

NV_STATUS uvm_kvc_create_range(uvm_va_space_t *va_space, NvU64 base, NvU64 length)
{
    uvm_kvc_ext_range_t *range = NULL;
    struct mm_struct *mm;
    NV_STATUS status;

    if (uvm_api_range_invalid_64k(base, length))
        return NV_ERR_INVALID_ADDRESS;

    /* As uvm_create_external_range(): the mm lock drops stale HMM va_blocks. */
    mm = uvm_va_space_mm_or_current_retain_lock(va_space);
    uvm_va_space_down_write(va_space);

    status = uvm_kvc_ext_range_create(va_space, mm, base, length, &range);
    if (status == NV_OK)
        uvm_kvc_ext_range_owned(range) = true;

    uvm_va_space_up_write(va_space);
    uvm_va_space_mm_or_current_release_unlock(va_space, mm);
    return status;
}

NV_STATUS uvm_api_kvc_create_range(UVM_KVC_CREATE_RANGE_PARAMS *params, struct file *filp)
{
    uvm_va_space_t *va_space = uvm_va_space_get(filp);
    NV_STATUS status;

    status = kvc_check_header(params->version, params->flags, 0, params->pad0);
    if (status != NV_OK)
        return status;
    if (params->reserved != 0)
        return NV_ERR_INVALID_ARGUMENT;

    status = uvm_kvc_create_range(va_space, params->base, params->length);
    if (status != NV_OK)
        UVM_DBG_PRINT_RL("KVC range [0x%llx, 0x%llx) not created: %s\n",
                         params->base, params->base + params->length, nvstatusToString(status));
    return status;
}

/* ---------------------------------------------------------------------------------------------
 * MAP, MAP_SCATTER, UNMAP
 */

/* One run of consecutive VA in one KVC range: becomes one uvm_ext_gpu_map_t. */
typedef struct
{
    uvm_kvc_ext_range_t *range;
    NvU64 start;
    NvU64 length;
    NvU64 first;        /* index of its first entry in the sorted order */
    NvU64 entries;
    uvm_kvc_map_t *map; /* owned until attached to an ext_gpu_map */
    bool mapped;
} kvc_run_t;

typedef struct
{
    NvU64 va;
    NvU64 length;
    uvm_kvc_page_t *page;
} kvc_item_t;

static int kvc_item_cmp(const void *a, const void *b)
{
    const kvc_item_t *x = a, *y = b;

    if (x->va < y->va)
        return -1;
    return x->va > y->va;
}

static NvU64 kvc_pte_maker(uvm_page_table_range_vec_t *range_vec, NvU64 offset, void *caller_data)
{
    uvm_kvc_map_t *map = caller_data;
    uvm_kvc_pte_t *pte = &map->ptes[offset / KVC_SLOT_SIZE];

    UVM_ASSERT(offset / KVC_SLOT_SIZE < map->count);

    return range_vec->tree->hal->make_pte(UVM_APERTURE_VID,
                                          kvc_page_phys(pte->page, pte->sub),
                                          map->prot,
                                          UVM_MMU_PTE_FLAGS_CACHED | UVM_MMU_PTE_FLAGS_ACCESS_COUNTERS_DISABLED);
}

void uvm_kvc_map_release(uvm_kvc_map_t *map)
{
    uvm_kvc_va_space_t *kvc;
    NvU64 i;

    if (!map)
        return;

    if (map->count) {
        kvc = map->ptes[0].page->kvc;
        uvm_mutex_lock(&kvc->lock);
        for (i = 0; i < map->count; i++)
            kvc_page_put_locked(kvc, map->ptes[i].page, 1);
        uvm_mutex_unlock(&kvc->lock);
    }
    uvm_kvfree(map);
}

NV_STATUS uvm_kvc_map_split_prepare(uvm_ext_gpu_map_t *existing_map, NvU64 new_start, uvm_ext_gpu_map_t *new_map)
{
    uvm_kvc_map_t *old = existing_map->kvc;
    uvm_kvc_map_t *upper;
    NvU64 k, n;

    UVM_ASSERT(old);
    UVM_ASSERT(IS_ALIGNED(new_start - existing_map->node.start, KVC_SLOT_SIZE));

    k = (new_start - existing_map->node.start) / KVC_SLOT_SIZE;
    UVM_ASSERT(k > 0 && k < old->count);
    n = old->count - k;

    upper = uvm_kvmalloc(sizeof(*upper) + n * sizeof(upper->ptes[0]));
    if (!upper)
        return NV_ERR_NO_MEMORY;
    upper->count = n;
    upper->prot = old->prot;
    memcpy(upper->ptes, &old->ptes[k], n * sizeof(upper->ptes[0]));
    new_map->kvc = upper;
    return NV_OK;
}

void uvm_kvc_map_split_commit(uvm_ext_gpu_map_t *existing_map, uvm_ext_gpu_map_t *new_map)
{
    /* The references move with the PTEs: no count changes. */
    existing_map->kvc->count -= new_map->kvc->count;
}

void uvm_kvc_map_split_abort(uvm_ext_gpu_map_t *new_map)
{
    uvm_kvfree(new_map->kvc);
    new_map->kvc = NULL;
}

/* Range tree lock held. Anything mapped in [start, end] on gpu? */
static bool kvc_range_has_mappings(uvm_kvc_ext_range_t *range, uvm_gpu_t *gpu, NvU64 start, NvU64 end)
{
    return uvm_ext_gpu_map_iter_first(range, gpu, start, end) != NULL;
}

/* va_space lock held for read. Maps one run (its map is consumed: attached or freed). */
static NV_STATUS kvc_map_run(uvm_va_space_t *va_space,
                             uvm_gpu_t *gpu,
                             kvc_run_t *run,
                             bool no_replace,
                             struct list_head *deferred)
{
    uvm_gpu_va_space_t *gpu_va_space = uvm_gpu_va_space_get(va_space, gpu);
    uvm_ext_gpu_range_tree_t *range_tree = uvm_ext_gpu_range_tree(run->range, gpu);
    uvm_ext_gpu_map_t *ext_gpu_map;
    NvU64 end = run->start + run->length - 1;
    NV_STATUS status;

    UVM_ASSERT(gpu_va_space);

    ext_gpu_map = uvm_kvmalloc_zero(sizeof(*ext_gpu_map));
    if (!ext_gpu_map)
        return NV_ERR_NO_MEMORY;

    uvm_mutex_lock(&range_tree->lock);

    /* NO_REPLACE was checked before any side effect; checked again under this lock so that a
     * mapping another thread made since is refused, not replaced (the caller then undoes the
     * runs it mapped: with NO_REPLACE the call is all or nothing). */
    if (no_replace && kvc_range_has_mappings(run->range, gpu, run->start, end)) {
        uvm_mutex_unlock(&range_tree->lock);
        uvm_kvfree(ext_gpu_map);
        return NV_ERR_UVM_ADDRESS_IN_USE;
    }

    /* UvmMapExternal semantics: a new map over an existing one behaves as if it was unmapped
     * first. */
    status = uvm_kvc_unmap_external_in_range(run->range, gpu, run->start, end, deferred);
    if (status != NV_OK) {
        uvm_mutex_unlock(&range_tree->lock);
        uvm_kvfree(ext_gpu_map);
        return status;
    }

    ext_gpu_map->node.start = run->start;
    ext_gpu_map->node.end = end;
    RB_CLEAR_NODE(&ext_gpu_map->node.rb_node);
    uvm_tracker_init(&ext_gpu_map->tracker);

    /* Cannot fail: the VA was unmapped just above, under the same lock. */
    status = uvm_range_tree_add(&range_tree->tree, &ext_gpu_map->node);
    UVM_ASSERT(status == NV_OK);

    uvm_processor_mask_set_atomic(uvm_kvc_ext_range_mapped_gpus(run->range), gpu->id);
    ext_gpu_map->gpu = gpu;
    /* Local vidmem of the mapping GPU; owning_gpu stays NULL (no RM handle, no peer), so the
     * stock teardown uses a GPU membar, which is right for local memory. */
    ext_gpu_map->owning_gpu = NULL;
    ext_gpu_map->is_sysmem = false;
    ext_gpu_map->kvc = run->map;
    run->map = NULL;

    status = uvm_page_table_range_vec_init(&gpu_va_space->page_tables,
                                           run->start,
                                           run->length,
                                           UVM_PAGE_SIZE_64K,
                                           UVM_PMM_ALLOC_FLAGS_EVICT,
                                           &ext_gpu_map->pt_range_vec);
    if (status == NV_OK) {
        /* Ends the PTE batch (WFI + membar) before one TLB invalidate, then waits: the mapping
         * is live when this returns. MEMBAR_NONE: the pages were zeroed by a push that was
         * waited on, and any previous mapping was torn down above with its own membar. */
        status = uvm_page_table_range_vec_write_ptes(&ext_gpu_map->pt_range_vec,
                                                     UVM_MEMBAR_NONE,
                                                     kvc_pte_maker,
                                                     ext_gpu_map->kvc);
    }
    if (status != NV_OK)
        uvm_ext_gpu_map_destroy(run->range, ext_gpu_map, NULL);
    else
        run->mapped = true;

    uvm_mutex_unlock(&range_tree->lock);
    return status;
}

/* va_space lock held for read: unmap [start, start + length) of range on gpu. */
static NV_STATUS kvc_unmap_locked(uvm_kvc_ext_range_t *range,
                                  uvm_gpu_t *gpu,
                                  NvU64 start,
                                  NvU64 length,
                                  struct list_head *deferred)
{
    uvm_ext_gpu_range_tree_t *range_tree = uvm_ext_gpu_range_tree(range, gpu);
    NV_STATUS status;

    uvm_mutex_lock(&range_tree->lock);
    status = uvm_kvc_unmap_external_in_range(range, gpu, start, start + length - 1, deferred);
    uvm_mutex_unlock(&range_tree->lock);
    return status;
}

/* va_space lock held for read. The KVC range that contains [va, va + length), or NULL. */
static uvm_kvc_ext_range_t *kvc_find_range(uvm_va_space_t *va_space, NvU64 va, NvU64 length)
{
    uvm_kvc_ext_range_t *range = uvm_kvc_ext_range_find(va_space, va);

    if (!range || !uvm_kvc_ext_range_owned(range))
        return NULL;
    if (va + length - 1 > uvm_kvc_ext_range_node(range)->end)
        return NULL;
    return range;
}

NV_STATUS uvm_kvc_map_scatter(uvm_va_space_t *va_space,
                              const NvProcessorUuid *gpu_uuid,
                              NvU32 flags,
                              const UVM_KVC_SCATTER_ENTRY *entries,
                              NvU64 count)
{
    uvm_kvc_va_space_t *kvc;
    kvc_item_t *items = NULL;
    kvc_run_t *runs = NULL;
    NvU64 nruns = 0, i, j, refs_taken = 0;
    uvm_gpu_t *gpu = NULL;
    NV_STATUS status;
    LIST_HEAD(deferred_free_list);

    UVM_ASSERT(count > 0 && count <= UVM_KVC_MAX_BATCH);

    items = uvm_kvmalloc_zero(count * sizeof(*items));
    runs = uvm_kvmalloc_zero(count * sizeof(*runs));
    if (!items || !runs) {
        status = NV_ERR_NO_MEMORY;
        goto out_free;
    }

    uvm_va_space_down_read(va_space);

    status = kvc_get_gpu(va_space, gpu_uuid, &gpu);
    if (status != NV_OK)
        goto out_unlock;

    kvc = READ_ONCE(va_space->kvc);
    if (!kvc) {
        status = NV_ERR_INVALID_OBJECT_HANDLE;
        goto out_unlock;
    }

    /* 1. Handles: valid in this va_space, of this GPU; take one reference per PTE. */
    uvm_mutex_lock(&kvc->lock);
    for (i = 0; i < count; i++) {
        uvm_kvc_page_t *page = kvc_lookup_locked(kvc, entries[i].handle);

        if (!page) {
            status = NV_ERR_INVALID_OBJECT_HANDLE;
            break;
        }
        if (page->gpu != gpu) {
            status = NV_ERR_INVALID_DEVICE;
            break;
        }
        page->refs += page->nslots;
        items[i].page = page;
        items[i].va = entries[i].va;
        items[i].length = (NvU64)page->nslots * KVC_SLOT_SIZE;
        refs_taken++;
    }
    uvm_mutex_unlock(&kvc->lock);
    if (status != NV_OK)
        goto out_put;

    /* 2. Addresses: aligned, no overflow, inside KVC ranges, addressable, not overlapping. */
    for (i = 0; i < count; i++) {
        if (uvm_api_range_invalid_64k(items[i].va, items[i].length)) {
            status = NV_ERR_INVALID_ADDRESS;
            goto out_put;
        }
    }
    sort(items, count, sizeof(*items), kvc_item_cmp, NULL);
    for (i = 0; i < count; i++) {
        uvm_kvc_ext_range_t *range = kvc_find_range(va_space, items[i].va, items[i].length);

        if (!range) {
            status = NV_ERR_INVALID_ADDRESS;
            goto out_put;
        }
        if (!uvm_gpu_can_address(gpu, items[i].va, items[i].length)) {
            status = NV_ERR_OUT_OF_RANGE;
            goto out_put;
        }
        if (i > 0 && items[i - 1].va + items[i - 1].length > items[i].va) {
            status = NV_ERR_INVALID_ARGUMENT;
            goto out_put;
        }

        /* Coalesce VA-contiguous entries of one range into one mapping. */
        if (nruns > 0 && runs[nruns - 1].range == range &&
            runs[nruns - 1].start + runs[nruns - 1].length == items[i].va) {
            runs[nruns - 1].length += items[i].length;
            runs[nruns - 1].entries++;
        }
        else {
            runs[nruns].range = range;
            runs[nruns].start = items[i].va;
            runs[nruns].length = items[i].length;
            runs[nruns].first = i;
            runs[nruns].entries = 1;
            nruns++;
        }
    }

    /* 3. NO_REPLACE: refuse before touching anything. */
    if (flags & UVM_KVC_MAP_FLAGS_NO_REPLACE) {
        for (i = 0; i < nruns; i++) {
            uvm_ext_gpu_range_tree_t *range_tree = uvm_ext_gpu_range_tree(runs[i].range, gpu);
            bool busy;

            uvm_mutex_lock(&range_tree->lock);
            busy = kvc_range_has_mappings(runs[i].range, gpu, runs[i].start, runs[i].start + runs[i].length - 1);
            uvm_mutex_unlock(&range_tree->lock);
            if (busy) {
                status = NV_ERR_UVM_ADDRESS_IN_USE;
                goto out_put;
            }
        }
    }

    /* 4. All kernel memory for the mappings, before the first side effect. */
    for (i = 0; i < nruns; i++) {
        NvU64 ptes = runs[i].length / KVC_SLOT_SIZE, p = 0;
        uvm_kvc_map_t *map = uvm_kvmalloc(sizeof(*map) + ptes * sizeof(map->ptes[0]));

        if (!map) {
            status = NV_ERR_NO_MEMORY;
            goto out_put;
        }
        map->count = ptes;
        map->prot = (flags & UVM_KVC_MAP_FLAGS_READ_ONLY) ? UVM_PROT_READ_ONLY : UVM_PROT_READ_WRITE_ATOMIC;
        for (j = runs[i].first; j < runs[i].first + runs[i].entries; j++) {
            NvU32 sub;

            for (sub = 0; sub < items[j].page->nslots; sub++) {
                map->ptes[p].page = items[j].page;
                map->ptes[p].sub = sub;
                p++;
            }
        }
        UVM_ASSERT(p == ptes);
        runs[i].map = map;
    }

    /* 5. Map. The references now belong to the run maps. */
    refs_taken = 0;
    for (i = 0; i < nruns; i++) {
        status = kvc_map_run(va_space, gpu, &runs[i], flags & UVM_KVC_MAP_FLAGS_NO_REPLACE, &deferred_free_list);
        if (status != NV_OK)
            break;
    }

    if (status != NV_OK) {
        /* Remove what this call mapped. Without NO_REPLACE, mappings it already replaced stay
         * unmapped (as with UvmMapExternal); with NO_REPLACE nothing was replaced, so the call
         * changed nothing. */
        for (j = 0; j < nruns; j++) {
            if (runs[j].mapped)
                (void)kvc_unmap_locked(runs[j].range, gpu, runs[j].start, runs[j].length, &deferred_free_list);
            /* Unattached run maps still hold their references. */
            uvm_kvc_map_release(runs[j].map);
            runs[j].map = NULL;
        }
    }

out_put:
    if (refs_taken) {
        for (i = 0; i < nruns; i++) {
            uvm_kvfree(runs[i].map);
            runs[i].map = NULL;
        }
        uvm_mutex_lock(&kvc->lock);
        /* items[] may have been sorted: every taken reference is still in it exactly once. */
        for (i = 0; i < count; i++) {
            if (items[i].page)
                kvc_page_put_locked(kvc, items[i].page, items[i].page->nslots);
        }
        uvm_mutex_unlock(&kvc->lock);
    }

out_unlock:
    if (!list_empty(&deferred_free_list))
        uvm_gpu_retain(gpu);
    uvm_va_space_up_read(va_space);
    if (!list_empty(&deferred_free_list)) {
        uvm_deferred_free_object_list(&deferred_free_list);
        uvm_gpu_release(gpu);
    }

out_free:
    uvm_kvfree(items);
    uvm_kvfree(runs);
    return status;
}

/* MAP places handles back to back from base, each taking its own page size of VA. Handle sizes
 * never change, so they can be read here; a handle that is not found keeps a 64K step and the
 * scatter path (which validates everything again under the lock) refuses it. */
static void kvc_layout_contiguous(uvm_va_space_t *va_space,
                                  NvU64 base,
                                  const NvU64 *handles,
                                  UVM_KVC_SCATTER_ENTRY *entries,
                                  NvU64 count)
{
    uvm_kvc_va_space_t *kvc;
    NvU64 i, va = base;

    uvm_va_space_down_read(va_space);
    kvc = READ_ONCE(va_space->kvc);
    if (kvc)
        uvm_mutex_lock(&kvc->lock);
    for (i = 0; i < count; i++) {
        uvm_kvc_page_t *page = kvc ? kvc_lookup_locked(kvc, handles[i]) : NULL;

        entries[i].va = va;
        entries[i].handle = handles[i];
        va += page ? (NvU64)page->nslots * KVC_SLOT_SIZE : KVC_SLOT_SIZE;
    }
    if (kvc)
        uvm_mutex_unlock(&kvc->lock);
    uvm_va_space_up_read(va_space);
}

NV_STATUS uvm_api_kvc_map(UVM_KVC_MAP_PARAMS *params, struct file *filp)
{
    uvm_va_space_t *va_space = uvm_va_space_get(filp);
    UVM_KVC_SCATTER_ENTRY *entries;
    NvU64 *handles;
    NV_STATUS status;

    params->countDone = 0;
    status = kvc_check_header(params->version,
                              params->flags,
                              UVM_KVC_MAP_FLAGS_NO_REPLACE | UVM_KVC_MAP_FLAGS_READ_ONLY,
                              params->pad0);
    if (status != NV_OK)
        return status;
    if (params->reserved != 0 || params->handlesPtr == 0)
        return NV_ERR_INVALID_ARGUMENT;
    status = kvc_count_valid(params->count);
    if (status != NV_OK)
        return status;
    if (!IS_ALIGNED(params->base, KVC_SLOT_SIZE) || params->base == 0 ||
        params->base + params->count * UVM_KVC_PAGE_SIZE_256K < params->base)
        return NV_ERR_INVALID_ADDRESS;

    handles = uvm_kvmalloc(params->count * sizeof(*handles));
    entries = uvm_kvmalloc(params->count * sizeof(*entries));
    if (!handles || !entries) {
        status = NV_ERR_NO_MEMORY;
        goto out;
    }
    if (copy_from_user(handles, (const void __user *)(uintptr_t)params->handlesPtr, params->count * sizeof(*handles))) {
        status = NV_ERR_INVALID_ADDRESS;
        goto out;
    }

    kvc_layout_contiguous(va_space, params->base, handles, entries, params->count);

    status = uvm_kvc_map_scatter(va_space, &params->gpuUuid, params->flags, entries, params->count);

    if (status == NV_OK)
        params->countDone = params->count;
    else
        UVM_DBG_PRINT_RL("KVC map of %llu pages at 0x%llx failed: %s\n",
                         params->count, params->base, nvstatusToString(status));

out:
    uvm_kvfree(handles);
    uvm_kvfree(entries);
    return status;
}

NV_STATUS uvm_api_kvc_map_scatter(UVM_KVC_MAP_SCATTER_PARAMS *params, struct file *filp)
{
    uvm_va_space_t *va_space = uvm_va_space_get(filp);
    UVM_KVC_SCATTER_ENTRY *entries;
    NV_STATUS status;

    params->countDone = 0;
    status = kvc_check_header(params->version,
                              params->flags,
                              UVM_KVC_MAP_FLAGS_NO_REPLACE | UVM_KVC_MAP_FLAGS_READ_ONLY,
                              params->pad0);
    if (status != NV_OK)
        return status;
    if (params->reserved != 0 || params->entriesPtr == 0)
        return NV_ERR_INVALID_ARGUMENT;
    status = kvc_count_valid(params->count);
    if (status != NV_OK)
        return status;

    entries = uvm_kvmalloc(params->count * sizeof(*entries));
    if (!entries)
        return NV_ERR_NO_MEMORY;
    if (copy_from_user(entries, (const void __user *)(uintptr_t)params->entriesPtr, params->count * sizeof(*entries))) {
        uvm_kvfree(entries);
        return NV_ERR_INVALID_ADDRESS;
    }

    status = uvm_kvc_map_scatter(va_space, &params->gpuUuid, params->flags, entries, params->count);
    if (status == NV_OK)
        params->countDone = params->count;
    else
        UVM_DBG_PRINT_RL("KVC scatter map of %llu pages failed: %s\n", params->count, nvstatusToString(status));

    uvm_kvfree(entries);
    return status;
}

NV_STATUS uvm_kvc_unmap(uvm_va_space_t *va_space, const NvProcessorUuid *gpu_uuid, NvU64 base, NvU64 length)
{
    uvm_kvc_ext_range_t *range;
    uvm_gpu_t *gpu = NULL;
    NV_STATUS status;
    LIST_HEAD(deferred_free_list);

    if (uvm_api_range_invalid_64k(base, length))
        return NV_ERR_INVALID_ADDRESS;

    uvm_va_space_down_read(va_space);

    range = kvc_find_range(va_space, base, length);
    if (!range) {
        status = NV_ERR_INVALID_ADDRESS;
        goto out;
    }
    gpu = uvm_va_space_get_gpu_by_uuid(va_space, gpu_uuid);
    if (!gpu) {
        status = NV_ERR_INVALID_DEVICE;
        goto out;
    }

    status = kvc_unmap_locked(range, gpu, base, length, &deferred_free_list);
    if (!list_empty(&deferred_free_list))
        uvm_gpu_retain(gpu);

out:
    uvm_va_space_up_read(va_space);
    if (!list_empty(&deferred_free_list)) {
        uvm_deferred_free_object_list(&deferred_free_list);
        uvm_gpu_release(gpu);
    }
    return status;
}

NV_STATUS uvm_api_kvc_unmap(UVM_KVC_UNMAP_PARAMS *params, struct file *filp)
{
    uvm_va_space_t *va_space = uvm_va_space_get(filp);
    NV_STATUS status;

    status = kvc_check_header(params->version, params->flags, 0, params->pad0);
    if (status != NV_OK)
        return status;
    if (params->reserved != 0)
        return NV_ERR_INVALID_ARGUMENT;

    status = uvm_kvc_unmap(va_space, &params->gpuUuid, params->base, params->length);
    if (status != NV_OK)
        UVM_DBG_PRINT_RL("KVC unmap [0x%llx, 0x%llx) failed: %s\n",
                         params->base, params->base + params->length, nvstatusToString(status));
    return status;
}

/* ---------------------------------------------------------------------------------------------
 * QUERY
 */

NV_STATUS uvm_api_kvc_query(UVM_KVC_QUERY_PARAMS *params, struct file *filp)
{
    static const NvProcessorUuid zero_uuid;
    uvm_va_space_t *va_space = NULL;
    uvm_fd_type_t type;
    NV_STATUS status;

    /* Numbers: clear of the regular ioctls (same switch: a clash is a duplicate case value) and
     * of the whole test range, and encodable on Windows (i <= 2047). */
    BUILD_BUG_ON(UVM_KVC_QUERY > UVM_TEST_IOCTL_BASE(0) - 1 && UVM_KVC_QUERY < UVM_TEST_IOCTL_BASE(512));
    BUILD_BUG_ON(UVM_KVC_TEST_SANITY > UVM_TEST_IOCTL_BASE(0) - 1 && UVM_KVC_TEST_SANITY < UVM_TEST_IOCTL_BASE(512));
    BUILD_BUG_ON(UVM_KVC_QUERY <= UVM_TEST_IOCTL_BASE(511));
    BUILD_BUG_ON(UVM_KVC_TEST_SANITY > UVM_IOCTL_BASE(2047));
    BUILD_BUG_ON(UVM_KVC_SUPPORTED_PAGE_SIZES & (KVC_SLOT_SIZE - 1));
    BUILD_BUG_ON(KVC_SLOTS_PER_ROOT != 32);
    BUILD_BUG_ON(UVM_KVC_PAGE_SIZE_256K / UVM_PAGE_SIZE_64K > KVC_SLOTS_PER_ROOT);

    params->magic = UVM_KVC_MAGIC;
    params->supportedPageSizes = UVM_KVC_SUPPORTED_PAGE_SIZES;
    params->maxBatch = UVM_KVC_MAX_BATCH;
    params->fdType = UVM_KVC_FD_UNINITIALIZED;
    params->gpuState = 0;
    params->pad1 = 0;
    params->quotaBytes = (NvU64)uvm_kvc_max_mb_per_va_space << 20;
    params->bytesHeld = 0;

    status = kvc_check_header(params->version, params->flags, 0, params->pad0);
    if (status != NV_OK)
        return status;

    type = uvm_fd_type(filp, (void **)&va_space);
    if (type == UVM_FD_VA_SPACE)
        params->fdType = UVM_KVC_FD_VA_SPACE;
    else if (type == UVM_FD_MM)
        params->fdType = UVM_KVC_FD_MM;
    else if (uvm_kvc_fd_is_test(type))
        params->fdType = UVM_KVC_FD_TEST;

    if (type == UVM_FD_VA_SPACE && va_space && memcmp(&params->gpuUuid, &zero_uuid, sizeof(zero_uuid)) != 0) {
        uvm_gpu_t *gpu;

        uvm_va_space_down_read(va_space);
        gpu = uvm_va_space_get_gpu_by_uuid(va_space, &params->gpuUuid);
        if (gpu) {
            params->gpuState |= UVM_KVC_GPU_REGISTERED;
            if (uvm_gpu_va_space_get(va_space, gpu))
                params->gpuState |= UVM_KVC_GPU_HAS_VA_SPACE;
            if (kvc_gpu_supported(va_space, gpu) == NV_OK)
                params->gpuState |= UVM_KVC_GPU_SUPPORTED;
            params->bytesHeld = uvm_kvc_bytes_allocated(va_space, gpu);
        }
        uvm_va_space_up_read(va_space);
    }
    return NV_OK;
}

/* ---------------------------------------------------------------------------------------------
 * Teardown hooks and helpers
 */

void uvm_kvc_unregister_gpu(uvm_va_space_t *va_space, uvm_gpu_t *gpu)
{
    uvm_kvc_va_space_t *kvc = READ_ONCE(va_space->kvc);
    uvm_kvc_pool_t *pool;
    uvm_kvc_page_t *page;
    int id;

    uvm_assert_rwsem_locked_write(&va_space->lock);

    if (!kvc)
        return;

    uvm_mutex_lock(&kvc->lock);
    idr_for_each_entry(&kvc->ids, page, id) {
        if (page->gpu != gpu)
            continue;
        idr_remove(&kvc->ids, id);
        page->in_table = false;
        /* Every mapping on this GPU was destroyed with its GPU VA space before this point; a
         * page still referenced would keep its root from PMM past the GPU's unregistration. */
        UVM_ASSERT_RELEASE(page->refs == 0);
        if (page->refs == 0)
            kvc_page_destroy_locked(kvc, page);
    }

    pool = kvc_pool(kvc, gpu);
    UVM_ASSERT(list_empty(&pool->roots));
    UVM_ASSERT(pool->bytes == 0);
    uvm_mutex_unlock(&kvc->lock);
}

void uvm_kvc_va_space_destroy(uvm_va_space_t *va_space)
{
    uvm_kvc_va_space_t *kvc = va_space->kvc;
    size_t i;

    if (!kvc)
        return;

    /* Every GPU was unregistered, which drained its handles and roots. */
    UVM_ASSERT(idr_is_empty(&kvc->ids));
    for (i = 0; i < ARRAY_SIZE(kvc->pools); i++)
        UVM_ASSERT(list_empty(&kvc->pools[i].roots));

    idr_destroy(&kvc->ids);
    va_space->kvc = NULL;
    uvm_kvfree(kvc);
}

NvU64 uvm_kvc_bytes_allocated(uvm_va_space_t *va_space, uvm_gpu_t *gpu)
{
    uvm_kvc_va_space_t *kvc = READ_ONCE(va_space->kvc);
    NvU64 bytes;

    if (!kvc)
        return 0;
    uvm_mutex_lock(&kvc->lock);
    bytes = kvc_pool(kvc, gpu)->bytes;
    uvm_mutex_unlock(&kvc->lock);
    return bytes;
}

NV_STATUS uvm_kvc_handle_phys(uvm_va_space_t *va_space, NvU64 handle, NvU64 *phys, NvU64 *size, NvU64 *refs)
{
    uvm_kvc_va_space_t *kvc = READ_ONCE(va_space->kvc);
    uvm_kvc_page_t *page;
    NV_STATUS status = NV_ERR_INVALID_OBJECT_HANDLE;

    if (!kvc)
        return status;
    uvm_mutex_lock(&kvc->lock);
    page = kvc_lookup_locked(kvc, handle);
    if (page) {
        *phys = kvc_page_phys(page, 0);
        *size = (NvU64)page->nslots * KVC_SLOT_SIZE;
        *refs = page->refs;
        status = NV_OK;
    }
    uvm_mutex_unlock(&kvc->lock);
    return status;
}

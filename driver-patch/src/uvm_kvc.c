/*
 * uvm_kvc.c: fd-owned 64 KiB GPU pages for nvidia-uvm: the ioctls, the limits, and the hooks
 * stock code calls (see uvm_kvc.h, uvm_kvc_internal.h, docs/driver.md).
 *
 * Rules followed throughout the KVC files:
 *  - every user-supplied field is validated before any side effect; batches are all or nothing;
 *  - user memory is copied in before and out after the va_space lock (no page fault under it);
 *  - only the process that owns the va_space may use it (a forked child holding the fd is
 *    refused with NV_ERR_ILLEGAL_ACTION), and what one process and all processes together hold
 *    per GPU, and the host memory a process uses for KVC bookkeeping, are capped by module
 *    parameters root can change at run time;
 *  - memory is zeroed (CE memset, waited on) before a handle to it is returned;
 *  - UVM_ASSERT only for internal invariants; user-triggerable failures log with
 *    UVM_DBG_PRINT_RL only;
 *  - nothing changes for a va_space that never calls these ioctls: va_space->kvc stays NULL and
 *    every hook returns at once.
 */

#include "uvm_kvc_internal.h"
#include "uvm_api.h"
#include "uvm_gpu.h"
#include "uvm_kvmalloc.h"
#include "uvm_test_ioctl.h"
#include "uvm_va_space_mm.h"

#include <linux/random.h>
#include <linux/sort.h>
#include <linux/uaccess.h>

static unsigned int uvm_kvc_max_gpu_percent = 90;
module_param(uvm_kvc_max_gpu_percent, uint, S_IRUGO | S_IWUSR);
MODULE_PARM_DESC(uvm_kvc_max_gpu_percent,
                 "KVC pages: most percent of a GPU's memory all processes together may hold (0: none)");

static unsigned int uvm_kvc_max_mb_per_process = 0;
module_param(uvm_kvc_max_mb_per_process, uint, S_IRUGO | S_IWUSR);
MODULE_PARM_DESC(uvm_kvc_max_mb_per_process,
                 "KVC pages: most MiB one process may hold on one GPU; 0 = only the GPU-wide cap");

static unsigned int uvm_kvc_max_meta_mb_per_process = 256;
module_param(uvm_kvc_max_meta_mb_per_process, uint, S_IRUGO | S_IWUSR);
MODULE_PARM_DESC(uvm_kvc_max_meta_mb_per_process,
                 "KVC: most MiB of kernel memory one process may use for page and page-table bookkeeping; 0 = no limit");

static bool uvm_kvc_allow_evict = false;
module_param(uvm_kvc_allow_evict, bool, S_IRUGO | S_IWUSR);
MODULE_PARM_DESC(uvm_kvc_allow_evict,
                 "KVC: let UVM_KVC_ALLOC_FLAGS_EVICT evict other processes' managed memory");

// ---------------------------------------------------------------------------------------------
// Accounting per process (mm) and per GPU

static LIST_HEAD(g_kvc_procs);
static DEFINE_SPINLOCK(g_kvc_procs_lock);
static atomic64_t g_kvc_gpu_bytes[UVM_ID_MAX_GPUS];

// The accounting record of `mm`, created on first use; NULL on allocation failure.
static uvm_kvc_proc_t *kvc_proc_get(struct mm_struct *mm)
{
    uvm_kvc_proc_t *proc, *fresh = uvm_kvmalloc_zero(sizeof(*fresh));

    spin_lock(&g_kvc_procs_lock);
    list_for_each_entry(proc, &g_kvc_procs, node) {
        if (proc->mm == mm) {
            proc->users++;
            spin_unlock(&g_kvc_procs_lock);
            uvm_kvfree(fresh);
            return proc;
        }
    }
    if (fresh) {
        fresh->mm = mm;
        fresh->tgid = current->tgid;
        fresh->users = 1;
        uvm_mmgrab(mm);
        list_add_tail(&fresh->node, &g_kvc_procs);
    }
    spin_unlock(&g_kvc_procs_lock);
    return fresh;
}

static void kvc_proc_put(uvm_kvc_proc_t *proc)
{
    bool last;

    spin_lock(&g_kvc_procs_lock);
    last = --proc->users == 0;
    if (last)
        list_del(&proc->node);
    spin_unlock(&g_kvc_procs_lock);

    if (last) {
        uvm_mmdrop(proc->mm);
        uvm_kvfree(proc);
    }
}

static NvU64 kvc_gpu_limit(uvm_gpu_t *gpu)
{
    NvU64 percent = min_t(NvU64, READ_ONCE(uvm_kvc_max_gpu_percent), 100);

    return gpu->mem_info.size / 100 * percent;
}

bool uvm_kvc_evict_allowed(void)
{
    return READ_ONCE(uvm_kvc_allow_evict);
}

// Charges one root to the va_space's process and to the GPU; INSUFFICIENT_RESOURCES over a cap.
NV_STATUS uvm_kvc_charge_root(uvm_kvc_va_space_t *kvc, uvm_gpu_t *gpu)
{
    NvU64 proc_limit = (NvU64)READ_ONCE(uvm_kvc_max_mb_per_process) << 20;
    size_t i = uvm_id_gpu_index(gpu->id);

    if (atomic64_add_return(KVC_ROOT_SIZE, &kvc->proc->bytes[i]) > proc_limit && proc_limit)
        goto undo_proc;
    if (atomic64_add_return(KVC_ROOT_SIZE, &g_kvc_gpu_bytes[i]) > kvc_gpu_limit(gpu))
        goto undo_gpu;
    return NV_OK;

undo_gpu:
    atomic64_sub(KVC_ROOT_SIZE, &g_kvc_gpu_bytes[i]);
undo_proc:
    atomic64_sub(KVC_ROOT_SIZE, &kvc->proc->bytes[i]);
    return NV_ERR_INSUFFICIENT_RESOURCES;
}

void uvm_kvc_uncharge_root(uvm_kvc_va_space_t *kvc, uvm_gpu_t *gpu)
{
    size_t i = uvm_id_gpu_index(gpu->id);

    atomic64_sub(KVC_ROOT_SIZE, &kvc->proc->bytes[i]);
    atomic64_sub(KVC_ROOT_SIZE, &g_kvc_gpu_bytes[i]);
}

NV_STATUS uvm_kvc_charge_meta(uvm_kvc_va_space_t *kvc, NvU64 bytes)
{
    NvU64 limit = (NvU64)READ_ONCE(uvm_kvc_max_meta_mb_per_process) << 20;

    if (atomic64_add_return(bytes, &kvc->proc->meta_bytes) > limit && limit) {
        atomic64_sub(bytes, &kvc->proc->meta_bytes);
        return NV_ERR_INSUFFICIENT_RESOURCES;
    }
    return NV_OK;
}

void uvm_kvc_uncharge_meta(uvm_kvc_va_space_t *kvc, NvU64 bytes)
{
    atomic64_sub(bytes, &kvc->proc->meta_bytes);
}

// /sys/module/nvidia_uvm/parameters/uvm_kvc_usage: one line per process using KVC,
// "pid P meta BYTES gpuN BYTES ..." (N: UVM's GPU index), at most one page.
static int kvc_usage_get(char *buffer, const struct kernel_param *kp)
{
    uvm_kvc_proc_t *proc;
    int len = 0;
    size_t i;

    spin_lock(&g_kvc_procs_lock);
    list_for_each_entry(proc, &g_kvc_procs, node) {
        len += scnprintf(buffer + len, PAGE_SIZE - len, "pid %d meta %lld",
                         proc->tgid, (long long)atomic64_read(&proc->meta_bytes));
        for (i = 0; i < ARRAY_SIZE(proc->bytes); i++) {
            long long bytes = atomic64_read(&proc->bytes[i]);

            if (bytes)
                len += scnprintf(buffer + len, PAGE_SIZE - len, " gpu%zu %lld", i, bytes);
        }
        len += scnprintf(buffer + len, PAGE_SIZE - len, "\n");
    }
    spin_unlock(&g_kvc_procs_lock);
    return len;
}

static int kvc_usage_set(const char *value, const struct kernel_param *kp)
{
    return -EPERM;
}

static const struct kernel_param_ops kvc_usage_ops = {
    .set = kvc_usage_set,
    .get = kvc_usage_get,
};
module_param_cb(uvm_kvc_usage, &kvc_usage_ops, NULL, S_IRUGO);
MODULE_PARM_DESC(uvm_kvc_usage, "KVC: what each process holds (read only)");

// ---------------------------------------------------------------------------------------------
// The va_space's state and who may use it

// The process allowed to use KVC on va_space: the one UVM associated with it, or without that
// association (multi-process sharing mode, no mmu notifiers), the first one that used KVC.
static struct mm_struct *kvc_owner_mm(uvm_va_space_t *va_space, uvm_kvc_va_space_t *kvc)
{
    if (uvm_va_space_mm_enabled(va_space))
        return va_space->va_space_mm.mm;
    return kvc ? kvc->owner_mm : current->mm;
}

static bool kvc_caller_owns(uvm_va_space_t *va_space, uvm_kvc_va_space_t *kvc)
{
    return current->mm && current->mm == kvc_owner_mm(va_space, kvc);
}

// va_space lock held. The va_space's KVC state if the caller's process owns the va_space
// (else NULL, ILLEGAL_ACTION); with `create`, made on first use (else NULL, NV_OK).
uvm_kvc_va_space_t *uvm_kvc_get(uvm_va_space_t *va_space, bool create, NV_STATUS *status)
{
    uvm_kvc_va_space_t *kvc = READ_ONCE(va_space->kvc);
    uvm_kvc_va_space_t *fresh;

    *status = NV_OK;
    if (!kvc_caller_owns(va_space, kvc)) {
        *status = NV_ERR_ILLEGAL_ACTION;
        return NULL;
    }
    if (kvc || !create)
        return kvc;

    fresh = uvm_kvmalloc_zero(sizeof(*fresh));
    if (!fresh) {
        *status = NV_ERR_NO_MEMORY;
        return NULL;
    }
    fresh->proc = kvc_proc_get(current->mm);
    if (!fresh->proc) {
        uvm_kvfree(fresh);
        *status = NV_ERR_NO_MEMORY;
        return NULL;
    }
    fresh->va_space = va_space;
    fresh->owner_mm = current->mm;
    // Generations start at a random point per va_space, so that a handle of another fd is not
    // also a valid handle here (it could only name this fd's own memory, but refusing it is
    // what callers expect).
    get_random_bytes(&fresh->gen, sizeof(fresh->gen));
    uvm_mutex_init(&fresh->lock, UVM_LOCK_ORDER_KVC);
    idr_init(&fresh->roots);

    if (cmpxchg(&va_space->kvc, NULL, fresh) != NULL) {
        idr_destroy(&fresh->roots);
        kvc_proc_put(fresh->proc);
        uvm_kvfree(fresh);
    }
    return READ_ONCE(va_space->kvc);
}

// GPUs the feature refuses: no 64K big pages in this GPU VA space, no sparse (pre-Pascal),
// confidential computing, and SR-IOV heavy virtualization (there the guest's page tables are
// not where vidmem PTEs written by physical address would be honoured).
static NV_STATUS kvc_gpu_supported(uvm_va_space_t *va_space, uvm_gpu_t *gpu)
{
    uvm_gpu_va_space_t *gpu_va_space = uvm_gpu_va_space_get(va_space, gpu);

    if (uvm_kvc_conf_computing_enabled(gpu))
        return NV_ERR_NOT_SUPPORTED;
    if (uvm_kvc_sriov_heavy(gpu))
        return NV_ERR_NOT_SUPPORTED;
    if (!uvm_kvc_sparse_supported(gpu))
        return NV_ERR_NOT_SUPPORTED;
    if (gpu_va_space && gpu_va_space->page_tables.big_page_size != UVM_PAGE_SIZE_64K)
        return NV_ERR_NOT_SUPPORTED;
    return NV_OK;
}

// va_space lock held: the GPU named by uuid, with a GPU VA space, supported.
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

// va_space lock held: the KVC range that contains [va, va + length), or NULL.
static uvm_kvc_ext_range_t *kvc_find_range(uvm_va_space_t *va_space, NvU64 va, NvU64 length)
{
    uvm_kvc_ext_range_t *range = uvm_kvc_ext_range_find(va_space, va);

    if (!range || !uvm_kvc_ext_range_owned(range))
        return NULL;
    if (va + length - 1 > uvm_kvc_ext_range_node(range)->end)
        return NULL;
    return range;
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

static bool kvc_page_size_valid(NvU64 page_size)
{
    return page_size == UVM_KVC_PAGE_SIZE_64K ||
           page_size == UVM_KVC_PAGE_SIZE_128K ||
           page_size == UVM_KVC_PAGE_SIZE_256K;
}

// A kernel copy of a user array of count elements of `size` bytes; NULL and *status set on
// failure.
static void *kvc_copy_in(NvU64 user_ptr, NvU64 count, size_t size, NV_STATUS *status)
{
    void *buf = uvm_kvmalloc(count * size);

    *status = NV_OK;
    if (!buf) {
        *status = NV_ERR_NO_MEMORY;
        return NULL;
    }
    if (copy_from_user(buf, (const void __user *)(uintptr_t)user_ptr, count * size)) {
        uvm_kvfree(buf);
        *status = NV_ERR_INVALID_ADDRESS;
        return NULL;
    }
    return buf;
}

// ---------------------------------------------------------------------------------------------
// ALLOC, FREE

NV_STATUS uvm_api_kvc_alloc(UVM_KVC_ALLOC_PARAMS *params, struct file *filp)
{
    uvm_va_space_t *va_space = uvm_va_space_get(filp);
    uvm_kvc_va_space_t *kvc;
    NvU64 *handles;
    uvm_gpu_t *gpu = NULL;
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
    if ((params->flags & UVM_KVC_ALLOC_FLAGS_EVICT) && !uvm_kvc_evict_allowed())
        return NV_ERR_INSUFFICIENT_PERMISSIONS;

    handles = uvm_kvmalloc(params->count * sizeof(*handles));
    if (!handles)
        return NV_ERR_NO_MEMORY;

    uvm_va_space_down_read(va_space);
    kvc = uvm_kvc_get(va_space, true, &status);
    if (kvc)
        status = kvc_get_gpu(va_space, &params->gpuUuid, &gpu);
    if (status == NV_OK)
        status = uvm_kvc_alloc_pages(kvc, gpu, params->pageSize, params->flags, params->count, handles);
    uvm_va_space_up_read(va_space);

    if (status == NV_OK) {
        if (copy_to_user((void __user *)(uintptr_t)params->handlesPtr, handles, params->count * sizeof(*handles))) {
            // Nobody learnt these handles: take them back. The caller still owns the va_space
            // (its ownership cannot change), so kvc is still there.
            uvm_va_space_down_read(va_space);
            (void)uvm_kvc_free_pages(kvc, 0, params->count, handles);
            uvm_va_space_up_read(va_space);
            status = NV_ERR_INVALID_ADDRESS;
        }
        else {
            params->countDone = params->count;
        }
    }
    if (status != NV_OK)
        UVM_DBG_PRINT_RL("KVC alloc of %llu x 0x%llx failed: %s\n",
                         params->count, params->pageSize, nvstatusToString(status));

    uvm_kvfree(handles);
    return status;
}

NV_STATUS uvm_api_kvc_free(UVM_KVC_FREE_PARAMS *params, struct file *filp)
{
    uvm_va_space_t *va_space = uvm_va_space_get(filp);
    uvm_kvc_va_space_t *kvc;
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

    handles = kvc_copy_in(params->handlesPtr, params->count, sizeof(*handles), &status);
    if (!handles)
        return status;

    uvm_va_space_down_read(va_space);
    kvc = uvm_kvc_get(va_space, false, &status);
    if (kvc)
        status = uvm_kvc_free_pages(kvc, params->flags, params->count, handles);
    else if (status == NV_OK)
        status = NV_ERR_INVALID_OBJECT_HANDLE;
    uvm_va_space_up_read(va_space);

    if (status == NV_OK)
        params->countDone = params->count;
    else
        UVM_DBG_PRINT_RL("KVC free of %llu handles failed: %s\n", params->count, nvstatusToString(status));

    uvm_kvfree(handles);
    return status;
}

// ---------------------------------------------------------------------------------------------
// CREATE_RANGE

NV_STATUS uvm_kvc_create_range(uvm_va_space_t *va_space, NvU64 base, NvU64 length)
{
    uvm_kvc_ext_range_t *range = NULL;
    struct mm_struct *mm;
    NV_STATUS status;

    // Whole 2 MiB blocks: a KVC page table is never shared with another range.
    if (length == 0 || length > KVC_RANGE_MAX || !IS_ALIGNED(base, KVC_BLOCK_SIZE) ||
        !IS_ALIGNED(length, KVC_BLOCK_SIZE) || uvm_api_range_invalid_64k(base, length))
        return NV_ERR_INVALID_ADDRESS;

    // As uvm_create_external_range(): the mm lock drops stale HMM va_blocks.
    mm = uvm_va_space_mm_or_current_retain_lock(va_space);
    uvm_va_space_down_write(va_space);

    if (uvm_kvc_get(va_space, true, &status))
        status = uvm_kvc_ext_range_create(va_space, mm, base, length, &range);
    if (status == NV_OK)
        uvm_kvc_ext_range_owned(range) = true;

    uvm_va_space_up_write(va_space);
    uvm_va_space_mm_or_current_release_unlock(va_space, mm);
    return status;
}

NV_STATUS uvm_api_kvc_create_range(UVM_KVC_CREATE_RANGE_PARAMS *params, struct file *filp)
{
    NV_STATUS status;

    status = kvc_check_header(params->version, params->flags, 0, params->pad0);
    if (status != NV_OK)
        return status;
    if (params->reserved != 0)
        return NV_ERR_INVALID_ARGUMENT;

    status = uvm_kvc_create_range(uvm_va_space_get(filp), params->base, params->length);
    if (status != NV_OK)
        UVM_DBG_PRINT_RL("KVC range [0x%llx, 0x%llx) not created: %s\n",
                         params->base, params->base + params->length, nvstatusToString(status));
    return status;
}

// ---------------------------------------------------------------------------------------------
// MAP, MAP_SCATTER, UNMAP

static int kvc_entry_cmp(const void *a, const void *b)
{
    const UVM_KVC_SCATTER_ENTRY *x = a, *y = b;

    return x->va < y->va ? -1 : x->va > y->va;
}

// KVC lock held. One reference per PTE on each entry's page, items filled; with `base`, the
// entries are laid out back to back from it (MAP), else they are at their own VAs (sorted).
// On failure the references taken are dropped again.
static NV_STATUS kvc_take_pages_locked(uvm_kvc_va_space_t *kvc,
                                       uvm_gpu_t *gpu,
                                       const UVM_KVC_SCATTER_ENTRY *entries,
                                       NvU64 count,
                                       NvU64 base,
                                       uvm_kvc_map_item_t *items)
{
    NV_STATUS status = NV_OK;
    NvU64 i, va = base;

    for (i = 0; i < count; i++) {
        uvm_kvc_root_t *root = uvm_kvc_root_lookup_locked(kvc, entries[i].handle, &items[i].slot);
        NvU32 nslots;

        if (!root) {
            status = NV_ERR_INVALID_OBJECT_HANDLE;
            break;
        }
        if (root->kgpu->gpu != gpu) {
            status = NV_ERR_INVALID_DEVICE;
            break;
        }
        nslots = 1u << root->order;
        if (root->refs[items[i].slot] + nslots > nslots * UVM_KVC_MAX_MAPPINGS_PER_PAGE) {
            status = NV_ERR_INSUFFICIENT_RESOURCES;
            break;
        }
        root->refs[items[i].slot] += nslots;
        items[i].root = root;
        items[i].nslots = nslots;
        items[i].va = base ? va : entries[i].va;
        va += (NvU64)nslots * KVC_SLOT_SIZE;
    }

    if (status != NV_OK) {
        while (i-- > 0)
            uvm_kvc_page_put_locked(kvc, items[i].root, items[i].slot, items[i].nslots);
    }
    return status;
}

// va_space lock held. Every item inside a KVC range the GPU can address, none overlapping the
// next (items are in VA order).
static NV_STATUS kvc_check_items(uvm_va_space_t *va_space, uvm_gpu_t *gpu, const uvm_kvc_map_item_t *items, NvU64 count)
{
    uvm_kvc_ext_range_t *range = NULL;
    NvU64 i;

    for (i = 0; i < count; i++) {
        NvU64 va = items[i].va, length = (NvU64)items[i].nslots * KVC_SLOT_SIZE;

        if (uvm_api_range_invalid_64k(va, length))
            return NV_ERR_INVALID_ADDRESS;
        if (!range || va + length - 1 > uvm_kvc_ext_range_node(range)->end || va < uvm_kvc_ext_range_node(range)->start)
            range = kvc_find_range(va_space, va, length);
        if (!range)
            return NV_ERR_INVALID_ADDRESS;
        if (!uvm_gpu_can_address(gpu, va, length))
            return NV_ERR_OUT_OF_RANGE;
        if (i > 0 && items[i - 1].va + (NvU64)items[i - 1].nslots * KVC_SLOT_SIZE > va)
            return NV_ERR_INVALID_ARGUMENT;
    }
    return NV_OK;
}

// MAP (base != 0: handles back to back from base) and MAP_SCATTER (entries at their own VAs;
// sorted here in place). All or nothing.
NV_STATUS uvm_kvc_map(uvm_va_space_t *va_space,
                         const NvProcessorUuid *gpu_uuid,
                         NvU32 flags,
                         UVM_KVC_SCATTER_ENTRY *entries,
                         NvU64 count,
                         NvU64 base)
{
    uvm_kvc_map_item_t *items = uvm_kvmalloc(count * sizeof(*items));
    bool consumed = false;
    uvm_kvc_va_space_t *kvc;
    uvm_gpu_t *gpu = NULL;
    NV_STATUS status;
    NvU64 i;

    if (!items)
        return NV_ERR_NO_MEMORY;
    if (!base)
        sort(entries, count, sizeof(*entries), kvc_entry_cmp, NULL);

    uvm_va_space_down_read(va_space);
    kvc = uvm_kvc_get(va_space, false, &status);
    if (!kvc) {
        status = status != NV_OK ? status : NV_ERR_INVALID_OBJECT_HANDLE;
        goto out;
    }
    status = kvc_get_gpu(va_space, gpu_uuid, &gpu);
    if (status != NV_OK)
        goto out;

    uvm_mutex_lock(&kvc->lock);
    status = kvc_take_pages_locked(kvc, gpu, entries, count, base, items);
    uvm_mutex_unlock(&kvc->lock);
    if (status != NV_OK)
        goto out;

    status = kvc_check_items(va_space, gpu, items, count);
    if (status == NV_OK)
        status = uvm_kvc_map_items(kvc, gpu, items, count, flags, &consumed);

    if (!consumed) {
        uvm_mutex_lock(&kvc->lock);
        for (i = 0; i < count; i++)
            uvm_kvc_page_put_locked(kvc, items[i].root, items[i].slot, items[i].nslots);
        uvm_mutex_unlock(&kvc->lock);
    }

out:
    uvm_va_space_up_read(va_space);
    uvm_kvfree(items);
    return status;
}

NV_STATUS uvm_api_kvc_map(UVM_KVC_MAP_PARAMS *params, struct file *filp)
{
    UVM_KVC_SCATTER_ENTRY *entries = NULL;
    NvU64 *handles;
    NV_STATUS status;
    NvU64 i;

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

    handles = kvc_copy_in(params->handlesPtr, params->count, sizeof(*handles), &status);
    if (handles)
        entries = uvm_kvmalloc(params->count * sizeof(*entries));
    if (handles && !entries)
        status = NV_ERR_NO_MEMORY;
    if (entries) {
        for (i = 0; i < params->count; i++)
            entries[i].handle = handles[i];
        status = uvm_kvc_map(uvm_va_space_get(filp), &params->gpuUuid, params->flags, entries, params->count, params->base);
    }

    if (status == NV_OK)
        params->countDone = params->count;
    else
        UVM_DBG_PRINT_RL("KVC map of %llu pages at 0x%llx failed: %s\n",
                         params->count, params->base, nvstatusToString(status));
    uvm_kvfree(handles);
    uvm_kvfree(entries);
    return status;
}

NV_STATUS uvm_api_kvc_map_scatter(UVM_KVC_MAP_SCATTER_PARAMS *params, struct file *filp)
{
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

    entries = kvc_copy_in(params->entriesPtr, params->count, sizeof(*entries), &status);
    if (!entries)
        return status;

    status = uvm_kvc_map(uvm_va_space_get(filp), &params->gpuUuid, params->flags, entries, params->count, 0);
    if (status == NV_OK)
        params->countDone = params->count;
    else
        UVM_DBG_PRINT_RL("KVC scatter map of %llu pages failed: %s\n", params->count, nvstatusToString(status));

    uvm_kvfree(entries);
    return status;
}

NV_STATUS uvm_kvc_unmap(uvm_va_space_t *va_space, const NvProcessorUuid *gpu_uuid, NvU64 base, NvU64 length)
{
    uvm_kvc_va_space_t *kvc;
    uvm_gpu_t *gpu;
    NV_STATUS status;

    if (uvm_api_range_invalid_64k(base, length))
        return NV_ERR_INVALID_ADDRESS;

    uvm_va_space_down_read(va_space);
    kvc = uvm_kvc_get(va_space, false, &status);
    if (status != NV_OK)
        goto out;
    if (!kvc_find_range(va_space, base, length)) {
        status = NV_ERR_INVALID_ADDRESS;
        goto out;
    }
    gpu = uvm_va_space_get_gpu_by_uuid(va_space, gpu_uuid);
    if (!gpu) {
        status = NV_ERR_INVALID_DEVICE;
        goto out;
    }
    // A KVC range exists, so kvc does (the range was made by a KVC ioctl).
    status = uvm_kvc_unmap_range_locked(kvc, gpu, base, base + length);

out:
    uvm_va_space_up_read(va_space);
    return status;
}

NV_STATUS uvm_api_kvc_unmap(UVM_KVC_UNMAP_PARAMS *params, struct file *filp)
{
    NV_STATUS status;

    status = kvc_check_header(params->version, params->flags, 0, params->pad0);
    if (status != NV_OK)
        return status;
    if (params->reserved != 0)
        return NV_ERR_INVALID_ARGUMENT;

    status = uvm_kvc_unmap(uvm_va_space_get(filp), &params->gpuUuid, params->base, params->length);
    if (status != NV_OK)
        UVM_DBG_PRINT_RL("KVC unmap [0x%llx, 0x%llx) failed: %s\n",
                         params->base, params->base + params->length, nvstatusToString(status));
    return status;
}

// ---------------------------------------------------------------------------------------------
// QUERY

// va_space lock held: the per-GPU and per-process numbers of QUERY.
static void kvc_query_gpu(uvm_va_space_t *va_space, UVM_KVC_QUERY_PARAMS *params)
{
    uvm_kvc_va_space_t *kvc = READ_ONCE(va_space->kvc);
    uvm_gpu_t *gpu = uvm_va_space_get_gpu_by_uuid(va_space, &params->gpuUuid);

    if (kvc)
        params->metaBytes = (NvU64)atomic64_read(&kvc->proc->meta_bytes);
    if (!gpu)
        return;

    params->gpuState |= UVM_KVC_GPU_REGISTERED;
    if (uvm_gpu_va_space_get(va_space, gpu))
        params->gpuState |= UVM_KVC_GPU_HAS_VA_SPACE;
    if (kvc_gpu_supported(va_space, gpu) == NV_OK)
        params->gpuState |= UVM_KVC_GPU_SUPPORTED;
    params->gpuBytes = (NvU64)atomic64_read(&g_kvc_gpu_bytes[uvm_id_gpu_index(gpu->id)]);
    params->gpuLimitBytes = kvc_gpu_limit(gpu);
    if (kvc) {
        params->fdBytes = uvm_kvc_bytes_held(kvc, gpu);
        params->processBytes = (NvU64)atomic64_read(&kvc->proc->bytes[uvm_id_gpu_index(gpu->id)]);
    }
}

NV_STATUS uvm_api_kvc_query(UVM_KVC_QUERY_PARAMS *params, struct file *filp)
{
    static const NvProcessorUuid zero_uuid;
    uvm_va_space_t *va_space = NULL;
    uvm_fd_type_t type;
    NV_STATUS status;

    // Numbers: clear of the regular ioctls (same switch: a clash is a duplicate case value) and
    // of the whole test range, and encodable on Windows (i <= 2047).
    BUILD_BUG_ON(UVM_KVC_QUERY > UVM_TEST_IOCTL_BASE(0) - 1 && UVM_KVC_QUERY < UVM_TEST_IOCTL_BASE(512));
    BUILD_BUG_ON(UVM_KVC_TEST_SANITY > UVM_TEST_IOCTL_BASE(0) - 1 && UVM_KVC_TEST_SANITY < UVM_TEST_IOCTL_BASE(512));
    BUILD_BUG_ON(UVM_KVC_QUERY <= UVM_TEST_IOCTL_BASE(511));
    BUILD_BUG_ON(UVM_KVC_TEST_SANITY > UVM_IOCTL_BASE(2047));
    BUILD_BUG_ON(UVM_KVC_SUPPORTED_PAGE_SIZES & (KVC_SLOT_SIZE - 1));
    BUILD_BUG_ON(KVC_ROOT_SIZE / KVC_SLOT_SIZE != KVC_SLOTS_PER_ROOT);
    BUILD_BUG_ON(KVC_BLOCK_SIZE / KVC_SLOT_SIZE != KVC_PTES_PER_BLOCK);
    BUILD_BUG_ON(UVM_KVC_MAX_MAPPINGS_PER_PAGE * 4 > 0xffff);
    BUILD_BUG_ON(sizeof(uvm_kvc_root_t) > 256);

    params->magic = UVM_KVC_MAGIC;
    params->supportedPageSizes = UVM_KVC_SUPPORTED_PAGE_SIZES;
    params->maxBatch = UVM_KVC_MAX_BATCH;
    params->maxMappingsPerPage = UVM_KVC_MAX_MAPPINGS_PER_PAGE;
    params->fdType = UVM_KVC_FD_UNINITIALIZED;
    params->gpuState = 0;
    params->callerState = 0;
    params->limitFlags = uvm_kvc_evict_allowed() ? UVM_KVC_LIMIT_EVICT_ALLOWED : 0;
    params->fdBytes = 0;
    params->processBytes = 0;
    params->processLimitBytes = (NvU64)READ_ONCE(uvm_kvc_max_mb_per_process) << 20;
    params->gpuBytes = 0;
    params->gpuLimitBytes = 0;
    params->metaBytes = 0;
    params->metaLimitBytes = (NvU64)READ_ONCE(uvm_kvc_max_meta_mb_per_process) << 20;

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

    if (type != UVM_FD_VA_SPACE || !va_space)
        return NV_OK;

    uvm_va_space_down_read(va_space);
    if (kvc_caller_owns(va_space, READ_ONCE(va_space->kvc)))
        params->callerState |= UVM_KVC_CALLER_OWNS_VA_SPACE;
    if (memcmp(&params->gpuUuid, &zero_uuid, sizeof(zero_uuid)) != 0)
        kvc_query_gpu(va_space, params);
    uvm_va_space_up_read(va_space);
    return NV_OK;
}

// ---------------------------------------------------------------------------------------------
// Hooks

void uvm_kvc_range_destroyed(uvm_kvc_ext_range_t *range)
{
    uvm_va_space_t *va_space = uvm_kvc_ext_range_va_space(range);
    uvm_kvc_va_space_t *kvc = va_space->kvc;
    size_t i;

    if (!uvm_kvc_ext_range_owned(range) || !kvc)
        return;
    uvm_assert_rwsem_locked_write(&va_space->lock);
    for (i = 0; i < ARRAY_SIZE(kvc->gpus); i++) {
        if (kvc->gpus[i])
            uvm_kvc_blocks_destroy(kvc, kvc->gpus[i], uvm_kvc_ext_range_node(range)->start, uvm_kvc_ext_range_node(range)->end + 1);
    }
}

void uvm_kvc_remove_gpu_va_space(uvm_va_space_t *va_space, uvm_gpu_t *gpu)
{
    uvm_kvc_va_space_t *kvc = va_space->kvc;
    uvm_kvc_gpu_t *kgpu = kvc ? uvm_kvc_gpu_get(kvc, gpu) : NULL;

    uvm_assert_rwsem_locked_write(&va_space->lock);
    if (kgpu)
        uvm_kvc_blocks_destroy(kvc, kgpu, 0, ~0ULL);
}

void uvm_kvc_unregister_gpu(uvm_va_space_t *va_space, uvm_gpu_t *gpu)
{
    uvm_kvc_va_space_t *kvc = va_space->kvc;
    uvm_kvc_gpu_t *kgpu = kvc ? uvm_kvc_gpu_get(kvc, gpu) : NULL;

    uvm_assert_rwsem_locked_write(&va_space->lock);
    if (!kgpu)
        return;
    // remove_gpu_va_space() ran first; this only matters if the GPU VA space was never there.
    uvm_kvc_blocks_destroy(kvc, kgpu, 0, ~0ULL);
    uvm_kvc_pool_drain(kvc, kgpu);
}

void uvm_kvc_va_space_destroy(uvm_va_space_t *va_space)
{
    uvm_kvc_va_space_t *kvc = va_space->kvc;
    size_t i;

    if (!kvc)
        return;

    // Every GPU was unregistered, which drained its blocks and roots.
    UVM_ASSERT(idr_is_empty(&kvc->roots));
    for (i = 0; i < ARRAY_SIZE(kvc->gpus); i++) {
        uvm_kvc_gpu_t *kgpu = kvc->gpus[i];

        if (!kgpu)
            continue;
        UVM_ASSERT(kgpu->bytes == 0 && kgpu->nblocks == 0);
        uvm_kvfree(kgpu);
        uvm_kvc_uncharge_meta(kvc, sizeof(*kgpu));
    }
    idr_destroy(&kvc->roots);
    kvc_proc_put(kvc->proc);
    va_space->kvc = NULL;
    uvm_kvfree(kvc);
}

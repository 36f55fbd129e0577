/*
 * uvm_kvc_pool.c: KVC pages. 2 MiB KERNEL-type PMM roots per va_space and GPU, split into 64 KiB
 * slots; a page (handle) is 1, 2 or 4 naturally aligned slots of one root, and every root
 * serves a single page size. See uvm_kvc_internal.h for the handle format and the locks.
 *
 * Contract kept here:
 *  - memory new to the va_space is zeroed (a CE memset that is waited on) before any handle to
 *    it is returned; PMM's is_zero is trusted unless the self-test says otherwise;
 *  - ALLOC and FREE are all or nothing;
 *  - a root goes back to PMM when its last slot is released, unless a PTE clear that pointed
 *    into it was not confirmed (leaked: kept forever, counted, never reused).
 */

#include "uvm_kvc_internal.h"
#include "uvm_gpu.h"
#include "uvm_hal.h"
#include "uvm_kvmalloc.h"

#include <linux/sort.h>

// Memsets per zeroing push: a push holds at most UVM_MAX_PUSH_SIZE of methods, and one CE memset
// takes well under 256 bytes on every architecture, so 64 stay far inside it.
#define KVC_ZERO_PER_PUSH 64

// One claimed page of an ALLOC call, before its handle is published.
typedef struct
{
    uvm_kvc_root_t *root;
    NvU32 slot;
    bool needs_zero;
} kvc_claim_t;

static NvU32 kvc_slot_mask(NvU32 slot, NvU32 nslots)
{
    return (NvU32)(((1ULL << nslots) - 1) << slot);
}

static NvU32 kvc_root_slots(const uvm_kvc_root_t *root)
{
    return 1u << root->order;
}

NvU64 uvm_kvc_slot_phys(const uvm_kvc_root_t *root, NvU32 slot)
{
    return root->chunk->address + (NvU64)slot * KVC_SLOT_SIZE;
}

uvm_kvc_gpu_t *uvm_kvc_gpu_get(uvm_kvc_va_space_t *kvc, uvm_gpu_t *gpu)
{
    return READ_ONCE(kvc->gpus[uvm_id_gpu_index(gpu->id)]);
}

// The per-GPU state, created on first use (cmpxchg: ALLOC and MAP run under the va_space lock
// in read mode, possibly concurrently). NULL on allocation failure or over the metadata cap.
uvm_kvc_gpu_t *uvm_kvc_gpu_get_or_create(uvm_kvc_va_space_t *kvc, uvm_gpu_t *gpu)
{
    uvm_kvc_gpu_t **slot = &kvc->gpus[uvm_id_gpu_index(gpu->id)];
    uvm_kvc_gpu_t *kgpu = READ_ONCE(*slot);
    size_t i;

    if (kgpu)
        return kgpu;
    if (uvm_kvc_charge_meta(kvc, sizeof(*kgpu)) != NV_OK)
        return NULL;

    kgpu = uvm_kvmalloc_zero(sizeof(*kgpu));
    if (!kgpu) {
        uvm_kvc_uncharge_meta(kvc, sizeof(*kgpu));
        return NULL;
    }
    kgpu->gpu = gpu;
    for (i = 0; i < ARRAY_SIZE(kgpu->partial); i++)
        INIT_LIST_HEAD(&kgpu->partial[i]);
    INIT_LIST_HEAD(&kgpu->full);
    INIT_LIST_HEAD(&kgpu->empty);
    uvm_mutex_init(&kgpu->map_lock, UVM_LOCK_ORDER_KVC_MAP);
    INIT_RADIX_TREE(&kgpu->blocks, NV_UVM_GFP_FLAGS);

    if (cmpxchg(slot, NULL, kgpu) != NULL) {
        uvm_kvfree(kgpu);
        uvm_kvc_uncharge_meta(kvc, sizeof(*kgpu));
    }
    return READ_ONCE(*slot);
}

// One CE memset in `push` with no membar of its own, as stock UVM zeroes new chunks
// (block_zero_new_gpu_chunk): the push's end carries a membar sys, and every zeroing push is
// waited on before a handle to the memory is returned.
static void kvc_zero(uvm_gpu_t *gpu, NvU64 phys, NvU64 size, uvm_push_t *push)
{
    uvm_gpu_address_t addr = uvm_gpu_address_copy(gpu, uvm_gpu_phys_address(UVM_APERTURE_VID, phys));

    uvm_push_set_flag(push, UVM_PUSH_FLAG_CE_NEXT_PIPELINED);
    uvm_push_set_flag(push, UVM_PUSH_FLAG_NEXT_MEMBAR_NONE);
    gpu->parent->ce_hal->memset_8(push, addr, 0, size);
}

// No KVC lock held. Zeroes the claims marked needs_zero, in pushes of at most KVC_ZERO_PER_PUSH
// memsets, and waits for all of them. Nobody else can reach these slots yet.
static NV_STATUS kvc_zero_claims(uvm_gpu_t *gpu, kvc_claim_t *claims, NvU64 count)
{
    uvm_tracker_t tracker = UVM_TRACKER_INIT();
    NV_STATUS status = NV_OK, wait_status;
    uvm_push_t push;
    NvU64 i = 0, first;
    NvU32 n, k;

    while (status == NV_OK) {
        for (first = i, n = 0; i < count && n < KVC_ZERO_PER_PUSH; i++)
            n += claims[i].needs_zero;
        if (n == 0)
            break;

        status = uvm_push_begin(gpu->channel_manager, UVM_CHANNEL_TYPE_GPU_INTERNAL, &push, "KVC zero %u pages", n);
        if (status != NV_OK)
            break;
        for (k = 0; k < n; first++) {
            kvc_claim_t *claim = &claims[first];

            if (!claim->needs_zero)
                continue;
            kvc_zero(gpu,
                     uvm_kvc_slot_phys(claim->root, claim->slot),
                     (NvU64)kvc_root_slots(claim->root) * KVC_SLOT_SIZE,
                     &push);
            k++;
        }
        uvm_push_end(&push);
        // On failure to track the push, this waits for it itself: nothing is left running.
        status = uvm_tracker_add_push_safe(&tracker, &push);
    }

    wait_status = uvm_tracker_wait_deinit(&tracker);
    return status != NV_OK ? status : wait_status;
}

// No lock held. A new root for pages of 1 << order slots, zeroed (the memset is complete).
static NV_STATUS kvc_root_new(uvm_kvc_va_space_t *kvc, uvm_gpu_t *gpu, NvU32 order, NvU32 flags, uvm_kvc_root_t **out)
{
    uvm_pmm_alloc_flags_t pmm_flags = UVM_PMM_ALLOC_FLAGS_NONE;
    uvm_kvc_root_t *root;
    uvm_push_t push;
    NV_STATUS status;

    if (flags & UVM_KVC_ALLOC_FLAGS_EVICT)
        pmm_flags |= UVM_PMM_ALLOC_FLAGS_EVICT;

    root = uvm_kvmalloc_zero(sizeof(*root));
    if (!root)
        return NV_ERR_NO_MEMORY;
    root->order = (NvU8)order;
    INIT_LIST_HEAD(&root->node);

    status = uvm_pmm_gpu_alloc_kernel(&gpu->pmm, 1, KVC_ROOT_SIZE, pmm_flags, &root->chunk, NULL);
    if (status != NV_OK)
        goto error;

    if (!root->chunk->is_zero || kvc->test.ignore_is_zero) {
        status = uvm_push_begin(gpu->channel_manager,
                                UVM_CHANNEL_TYPE_GPU_INTERNAL,
                                &push,
                                "KVC zero root 0x%llx",
                                root->chunk->address);
        if (status != NV_OK)
            goto error;
        kvc_zero(gpu, root->chunk->address, KVC_ROOT_SIZE, &push);
        status = uvm_push_end_and_wait(&push);
        if (status != NV_OK) {
            // The memset may still be running into the chunk: it is not PMM's again.
            root->chunk = NULL;
            goto error;
        }
    }

    *out = root;
    return NV_OK;

error:
    if (root->chunk)
        uvm_pmm_gpu_free(&gpu->pmm, root->chunk, NULL);
    uvm_kvfree(root);
    return status;
}

// KVC lock held. A new root joins the pool: limits charged, id assigned. On failure the root is
// given back to PMM and freed.
static NV_STATUS kvc_root_add_locked(uvm_kvc_va_space_t *kvc, uvm_kvc_gpu_t *kgpu, uvm_kvc_root_t *root)
{
    NV_STATUS status;
    int id;

    uvm_assert_mutex_locked(&kvc->lock);

    status = uvm_kvc_charge_root(kvc, kgpu->gpu);
    if (status != NV_OK)
        goto error;
    status = uvm_kvc_charge_meta(kvc, sizeof(*root));
    if (status != NV_OK)
        goto error_root;

    id = idr_alloc_cyclic(&kvc->roots, root, 1, KVC_ROOT_ID_MAX + 1, NV_UVM_GFP_FLAGS);
    if (id < 0) {
        status = id == -ENOSPC ? NV_ERR_INSUFFICIENT_RESOURCES : NV_ERR_NO_MEMORY;
        goto error_meta;
    }

    root->id = (NvU32)id;
    root->kgpu = kgpu;
    kgpu->bytes += KVC_ROOT_SIZE;
    list_add(&root->node, &kgpu->partial[root->order]);
    return NV_OK;

error_meta:
    uvm_kvc_uncharge_meta(kvc, sizeof(*root));
error_root:
    uvm_kvc_uncharge_root(kvc, kgpu->gpu);
error:
    uvm_pmm_gpu_free(&kgpu->gpu->pmm, root->chunk, NULL);
    uvm_kvfree(root);
    return status;
}

// KVC lock held. The root has no used slot left: back to PMM (or kept, if leaked).
static void kvc_root_free_locked(uvm_kvc_va_space_t *kvc, uvm_kvc_root_t *root)
{
    uvm_kvc_gpu_t *kgpu = root->kgpu;

    UVM_ASSERT(root->used == 0);

    idr_remove(&kvc->roots, root->id);
    list_del(&root->node);
    kgpu->bytes -= KVC_ROOT_SIZE;
    uvm_kvc_uncharge_root(kvc, kgpu->gpu);
    uvm_kvc_uncharge_meta(kvc, sizeof(*root));

    // No pending work: PTEs pointing here were cleared and waited on, and so was every memset.
    if (!root->leaked)
        uvm_pmm_gpu_free(&kgpu->gpu->pmm, root->chunk, NULL);
    else
        UVM_ERR_PRINT("KVC: GPU %s: root 0x%llx kept out of PMM after a GPU error\n",
                      uvm_gpu_name(kgpu->gpu), root->chunk->address);
    uvm_kvfree(root);
}

// KVC lock held. Slots of a page that is neither live nor mapped become free.
static void kvc_page_release_locked(uvm_kvc_va_space_t *kvc, uvm_kvc_root_t *root, NvU32 slot)
{
    NvU32 mask = kvc_slot_mask(slot, kvc_root_slots(root));
    bool was_full = root->used == ~(NvU32)0;

    UVM_ASSERT((root->used & mask) == mask);
    UVM_ASSERT(!(root->live & BIT(slot)));
    UVM_ASSERT(root->refs[slot] == 0);

    root->used &= ~mask;
    root->dirty |= mask;
    if (root->used == 0)
        kvc_root_free_locked(kvc, root);
    else if (was_full)
        list_move(&root->node, &root->kgpu->partial[root->order]);
}

// KVC lock held: the first free page of a partial root (there is one by definition).
static NvU32 kvc_root_free_slot(const uvm_kvc_root_t *root)
{
    NvU32 nslots = kvc_root_slots(root), slot;

    for (slot = 0; slot < KVC_SLOTS_PER_ROOT; slot += nslots) {
        if (!(root->used & kvc_slot_mask(slot, nslots)))
            return slot;
    }
    UVM_ASSERT(0);
    return 0;
}

// KVC lock held: the root and head slot of a live handle of this va_space, or NULL.
uvm_kvc_root_t *uvm_kvc_root_lookup_locked(uvm_kvc_va_space_t *kvc, NvU64 handle, NvU32 *slot)
{
    NvU32 id = (NvU32)handle;
    uvm_kvc_root_t *root;

    uvm_assert_mutex_locked(&kvc->lock);

    *slot = id & (KVC_SLOTS_PER_ROOT - 1);
    if ((id >> 5) == 0 || (id >> 5) > KVC_ROOT_ID_MAX)
        return NULL;
    root = idr_find(&kvc->roots, id >> 5);
    if (!root || !(root->live & BIT(*slot)) || root->gen[*slot] != (NvU32)(handle >> 32))
        return NULL;
    return root;
}

// KVC lock held: the root and head slot of the page a PTE record points at (live or freed).
uvm_kvc_root_t *uvm_kvc_rec_root_locked(uvm_kvc_va_space_t *kvc, uvm_kvc_pte_rec_t rec, NvU32 *slot)
{
    uvm_kvc_root_t *root = idr_find(&kvc->roots, rec >> 5);

    UVM_ASSERT(root);
    *slot = (rec & (KVC_SLOTS_PER_ROOT - 1)) & ~(kvc_root_slots(root) - 1);
    UVM_ASSERT(root->used & BIT(*slot));
    return root;
}

// KVC lock held: drop `ptes` PTE references of the page at head slot `slot`.
void uvm_kvc_page_put_locked(uvm_kvc_va_space_t *kvc, uvm_kvc_root_t *root, NvU32 slot, NvU32 ptes)
{
    UVM_ASSERT(root->refs[slot] >= ptes);
    root->refs[slot] -= ptes;
    if (root->refs[slot] == 0 && !(root->live & BIT(slot)))
        kvc_page_release_locked(kvc, root, slot);
}

// KVC lock held. Claims one page on kgpu of 1 << order slots, from a partial root; false if
// none has room.
static bool kvc_claim_locked(uvm_kvc_gpu_t *kgpu, NvU32 order, NvU32 flags, kvc_claim_t *claim)
{
    uvm_kvc_root_t *root = list_first_entry_or_null(&kgpu->partial[order], uvm_kvc_root_t, node);
    NvU32 mask;

    if (!root)
        return false;

    claim->root = root;
    claim->slot = kvc_root_free_slot(root);
    mask = kvc_slot_mask(claim->slot, kvc_root_slots(root));
    root->used |= mask;
    // Recycled slots hold this va_space's own data (a new root is zeroed before it joins the
    // pool): re-zeroed only on request. A failed call marks them dirty again.
    claim->needs_zero = (flags & UVM_KVC_ALLOC_FLAGS_ZERO) && (root->dirty & mask);
    root->dirty &= ~mask;
    if (root->used == ~(NvU32)0)
        list_move(&root->node, &kgpu->full);
    return true;
}

// No KVC lock held. Claims `count` pages, adding a new root to the pool whenever it runs dry.
// PMM allocation (possibly evicting) and zeroing of a new root happen without the KVC lock; each
// lock/unlock pair stays inside one block. Returns how many were claimed in *done; on failure
// those are still claimed (the caller gives them back under the lock).
static NV_STATUS kvc_claim_pages(uvm_kvc_va_space_t *kvc,
                                 uvm_kvc_gpu_t *kgpu,
                                 NvU32 order,
                                 NvU32 flags,
                                 kvc_claim_t *claims,
                                 NvU64 count,
                                 NvU64 *done)
{
    uvm_kvc_root_t *root = NULL;
    NV_STATUS status = NV_OK;

    while (status == NV_OK) {
        uvm_mutex_lock(&kvc->lock);
        while (*done < count && kvc_claim_locked(kgpu, order, flags, &claims[*done]))
            (*done)++;
        uvm_mutex_unlock(&kvc->lock);
        if (*done == count)
            break;

        status = kvc_root_new(kvc, kgpu->gpu, order, flags, &root);
        if (status == NV_OK) {
            uvm_mutex_lock(&kvc->lock);
            status = kvc_root_add_locked(kvc, kgpu, root);
            uvm_mutex_unlock(&kvc->lock);
        }
    }
    return status;
}

// KVC lock held. Gives back claimed, unpublished pages (they are marked dirty: they may hold
// data of this va_space).
static void kvc_unclaim_locked(uvm_kvc_va_space_t *kvc, kvc_claim_t *claims, NvU64 count)
{
    NvU64 i;

    for (i = 0; i < count; i++)
        kvc_page_release_locked(kvc, claims[i].root, claims[i].slot);
}

// va_space lock held (read). All or nothing: `count` pages of page_size on gpu, handles written
// to the kernel array `handles`.
NV_STATUS uvm_kvc_alloc_pages(uvm_kvc_va_space_t *kvc,
                              uvm_gpu_t *gpu,
                              NvU64 page_size,
                              NvU32 flags,
                              NvU64 count,
                              NvU64 *handles)
{
    NvU32 order = (NvU32)ilog2(page_size / KVC_SLOT_SIZE);
    uvm_kvc_gpu_t *kgpu;
    kvc_claim_t *claims;
    NvU64 i, done = 0;
    NV_STATUS status;

    UVM_ASSERT(order <= 2 && (KVC_SLOT_SIZE << order) == page_size);
    UVM_ASSERT(count > 0 && count <= UVM_KVC_MAX_BATCH);

    kgpu = uvm_kvc_gpu_get_or_create(kvc, gpu);
    if (!kgpu)
        return NV_ERR_NO_MEMORY;
    claims = uvm_kvmalloc(count * sizeof(*claims));
    if (!claims)
        return NV_ERR_NO_MEMORY;

    status = kvc_claim_pages(kvc, kgpu, order, flags, claims, count, &done);

    if (status == NV_OK)
        status = kvc_zero_claims(gpu, claims, count);

    uvm_mutex_lock(&kvc->lock);
    if (status == NV_OK) {
        // Publishing cannot fail: every handle becomes valid together.
        for (i = 0; i < count; i++) {
            uvm_kvc_root_t *root = claims[i].root;
            NvU32 slot = claims[i].slot;

            if (++kvc->gen == 0)
                kvc->gen = 1;
            root->gen[slot] = kvc->gen;
            root->live |= BIT(slot);
            handles[i] = ((NvU64)kvc->gen << 32) | ((NvU64)root->id << 5) | slot;
        }
    }
    else {
        kvc_unclaim_locked(kvc, claims, done);
    }
    uvm_mutex_unlock(&kvc->lock);

    uvm_kvfree(claims);
    return status;
}

static int kvc_u64_cmp(const void *a, const void *b)
{
    NvU64 x = *(const NvU64 *)a, y = *(const NvU64 *)b;

    return x < y ? -1 : x > y;
}

// va_space lock held (read). Validates every handle (unknown or stale: INVALID_OBJECT_HANDLE,
// duplicate: INVALID_ARGUMENT, FAIL_IF_MAPPED and mapped: IN_USE) before freeing any. Sorts
// `handles` in place.
NV_STATUS uvm_kvc_free_pages(uvm_kvc_va_space_t *kvc, NvU32 flags, NvU64 count, NvU64 *handles)
{
    NV_STATUS status = NV_OK;
    uvm_kvc_root_t *root;
    NvU32 slot;
    NvU64 i;

    sort(handles, count, sizeof(*handles), kvc_u64_cmp, NULL);

    uvm_mutex_lock(&kvc->lock);
    for (i = 0; i < count && status == NV_OK; i++) {
        root = uvm_kvc_root_lookup_locked(kvc, handles[i], &slot);
        if (!root)
            status = NV_ERR_INVALID_OBJECT_HANDLE;
        else if (i > 0 && handles[i] == handles[i - 1])
            status = NV_ERR_INVALID_ARGUMENT;
        else if ((flags & UVM_KVC_FREE_FLAGS_FAIL_IF_MAPPED) && root->refs[slot])
            status = NV_ERR_IN_USE;
    }

    for (i = 0; i < count && status == NV_OK; i++) {
        // Every handle was found above, under the same lock, and none twice.
        root = uvm_kvc_root_lookup_locked(kvc, handles[i], &slot);
        UVM_ASSERT(root);
        if (!root)
            continue;
        root->live &= ~BIT(slot);
        // A mapped page lives on until its last PTE is cleared.
        if (root->refs[slot] == 0)
            kvc_page_release_locked(kvc, root, slot);
    }
    uvm_mutex_unlock(&kvc->lock);
    return status;
}

// KVC lock held: the first root of kgpu's pool, or NULL.
static uvm_kvc_root_t *kvc_any_root_locked(uvm_kvc_gpu_t *kgpu)
{
    size_t i;

    for (i = 0; i < ARRAY_SIZE(kgpu->partial); i++) {
        if (!list_empty(&kgpu->partial[i]))
            return list_first_entry(&kgpu->partial[i], uvm_kvc_root_t, node);
    }
    return list_first_entry_or_null(&kgpu->full, uvm_kvc_root_t, node);
}

// va_space lock held for write, every KVC PTE of the GPU already cleared: invalidates every
// handle of kgpu and returns its roots to PMM.
void uvm_kvc_pool_drain(uvm_kvc_va_space_t *kvc, uvm_kvc_gpu_t *kgpu)
{
    uvm_kvc_root_t *root;
    NvU32 slot;

    uvm_mutex_lock(&kvc->lock);
    while ((root = kvc_any_root_locked(kgpu)) != NULL) {
        for (slot = 0; slot < KVC_SLOTS_PER_ROOT; slot++) {
            if (root->refs[slot] == 0)
                continue;
            // Every PTE of this GPU was cleared before: a reference here is a KVC bug. The root
            // stays out of PMM rather than be reused under a stale PTE.
            UVM_ERR_PRINT("KVC: GPU %s: page 0x%llx still has %u PTE references\n",
                          uvm_gpu_name(kgpu->gpu), uvm_kvc_slot_phys(root, slot), root->refs[slot]);
            root->leaked = true;
            root->refs[slot] = 0;
        }
        root->live = 0;
        root->used = 0;
        kvc_root_free_locked(kvc, root);
    }
    UVM_ASSERT(kgpu->bytes == 0);
    uvm_mutex_unlock(&kvc->lock);
}

NvU64 uvm_kvc_bytes_held(uvm_kvc_va_space_t *kvc, uvm_gpu_t *gpu)
{
    uvm_kvc_gpu_t *kgpu = uvm_kvc_gpu_get(kvc, gpu);
    NvU64 bytes = 0;

    if (kgpu) {
        uvm_mutex_lock(&kvc->lock);
        bytes = kgpu->bytes;
        uvm_mutex_unlock(&kvc->lock);
    }
    return bytes;
}

// Self-test helper: where a live handle's memory is, its size and its PTE references.
NV_STATUS uvm_kvc_handle_info(uvm_kvc_va_space_t *kvc, NvU64 handle, NvU64 *phys, NvU64 *size, NvU64 *refs)
{
    NV_STATUS status = NV_ERR_INVALID_OBJECT_HANDLE;
    uvm_kvc_root_t *root;
    NvU32 slot;

    uvm_mutex_lock(&kvc->lock);
    root = uvm_kvc_root_lookup_locked(kvc, handle, &slot);
    if (root) {
        *phys = uvm_kvc_slot_phys(root, slot);
        *size = (NvU64)kvc_root_slots(root) * KVC_SLOT_SIZE;
        *refs = root->refs[slot];
        status = NV_OK;
    }
    uvm_mutex_unlock(&kvc->lock);
    return status;
}

/*
 * uvm_kvc_map.c: the page tables of KVC ranges. Per va_space and GPU, a radix tree of 2 MiB
 * blocks (uvm_kvc_block_t), each the 32 64 KiB PTEs of one window taken from the stock page
 * tree (uvm_page_tree_get_ptes_async), with the slot each PTE maps.
 *
 * Every operation (MAP/MAP_SCATTER, UNMAP, a range's or a GPU VA space's teardown) is one
 * kvc_writer_t: all its PTE writes or clears go into one chain of pushes (a new push only when
 * the current one is full, each acquiring the one before, no wait in between), the last push
 * ends the PTE batch (WFI + membar) and carries the single TLB invalidate of the span touched
 * (uvm_tlb_batch picks ranged or invalidate-all by size), and one wait ends it. Bookkeeping is
 * changed only after that wait: a page's reference is dropped only once the GPU confirmed that
 * no PTE and no TLB entry points at it any more.
 *
 * A block whose PTEs are all clear is kept (its page table is reused by the next map in the
 * window, without a PMM round trip) up to max(KVC_EMPTY_BLOCKS_MIN, blocks in use) per GPU.
 */

#include "uvm_kvc_internal.h"
#include "uvm_gpu.h"
#include "uvm_hal.h"
#include "uvm_kvmalloc.h"
#include "uvm_pte_batch.h"
#include "uvm_tlb_batch.h"

// Push space kept free before each PTE write: a flushed inline batch plus, in the last push,
// the WFI, membar and TLB invalidate all fit in it.
#define KVC_PUSH_RESERVE 1024

// Blocks looked up per radix tree gang lookup.
#define KVC_GANG 32

typedef struct
{
    uvm_page_tree_t *tree;
    NvU32 entry_size;
    uvm_tracker_t tracker;
    uvm_push_t push;
    uvm_pte_batch_t pte_batch;
    bool open;
    NvU32 submitted;        // pushes ended so far: 0 means the GPU saw nothing of this writer
    NvU64 lo, hi;           // VA span touched
} kvc_writer_t;

// Map lock held. A writer whose first push will wait for pending page tree work (the
// initialisation of tables that get_ptes_async just allocated); if that cannot be tracked, the
// tree is waited for here instead. Fails only on a GPU error.
static NV_STATUS kvc_writer_begin(kvc_writer_t *w, uvm_page_tree_t *tree)
{
    NV_STATUS status;

    memset(w, 0, sizeof(*w));
    w->tree = tree;
    w->entry_size = uvm_mmu_pte_size(tree, UVM_PAGE_SIZE_64K);
    w->lo = ~0ULL;
    uvm_tracker_init(&w->tracker);

    uvm_mutex_lock(&tree->lock);
    status = uvm_tracker_add_tracker_safe(&w->tracker, &tree->tracker);
    uvm_mutex_unlock(&tree->lock);

    if (status != NV_OK)
        status = uvm_page_tree_wait(tree);
    return status;
}

static void kvc_writer_end_push(kvc_writer_t *w, bool last)
{
    uvm_pte_batch_end(&w->pte_batch);
    if (!last) {
        // The PTE batch's own membar orders these writes before the invalidate of the last push.
        uvm_push_set_flag(&w->push, UVM_PUSH_FLAG_NEXT_MEMBAR_NONE);
    }
    uvm_push_end(&w->push);
    // The push acquired the tracker: only the push itself needs tracking.
    uvm_tracker_overwrite_with_push(&w->tracker, &w->push);
    w->open = false;
    w->submitted++;
}

// An open push with room for one more PTE operation.
static NV_STATUS kvc_writer_room(kvc_writer_t *w)
{
    NV_STATUS status;

    if (w->open && uvm_push_has_space(&w->push, KVC_PUSH_RESERVE))
        return NV_OK;
    if (w->open)
        kvc_writer_end_push(w, false);

    status = uvm_push_begin_acquire(w->tree->gpu->channel_manager,
                                    UVM_CHANNEL_TYPE_GPU_INTERNAL,
                                    &w->tracker,
                                    &w->push,
                                    "KVC PTEs, push %u",
                                    w->submitted);
    if (status != NV_OK)
        return status;
    uvm_pte_batch_begin(&w->push, &w->pte_batch);
    w->open = true;
    return NV_OK;
}

static void kvc_writer_span(kvc_writer_t *w, NvU64 va, NvU64 size)
{
    w->lo = min(w->lo, va);
    w->hi = max(w->hi, va + size);
}

static NV_STATUS kvc_writer_pte(kvc_writer_t *w, uvm_kvc_block_t *block, NvU32 index, NvU64 bits)
{
    NV_STATUS status = kvc_writer_room(w);

    if (status != NV_OK)
        return status;
    uvm_pte_batch_write_pte(&w->pte_batch,
                            uvm_page_table_range_entry_address(w->tree, &block->ptes, index),
                            bits,
                            w->entry_size);
    kvc_writer_span(w, block->start + (NvU64)index * KVC_SLOT_SIZE, KVC_SLOT_SIZE);
    return NV_OK;
}

static NV_STATUS kvc_writer_clear(kvc_writer_t *w, uvm_kvc_block_t *block, NvU32 first, NvU32 count)
{
    NV_STATUS status = kvc_writer_room(w);

    if (status != NV_OK)
        return status;
    uvm_pte_batch_clear_ptes(&w->pte_batch,
                             uvm_page_table_range_entry_address(w->tree, &block->ptes, first),
                             0,
                             w->entry_size,
                             count);
    kvc_writer_span(w, block->start + (NvU64)first * KVC_SLOT_SIZE, (NvU64)count * KVC_SLOT_SIZE);
    return NV_OK;
}

// Ends the chain: the PTE batch, one TLB invalidate of the span with `membar`, one wait. With
// nothing written it only waits for what it acquired. `status` is the first error of the
// writes; the result is the first error of all.
static NV_STATUS kvc_writer_finish(kvc_writer_t *w, uvm_membar_t membar, NV_STATUS status)
{
    NV_STATUS wait_status;

    if (status == NV_OK && w->hi > w->lo) {
        status = kvc_writer_room(w);
        if (status == NV_OK) {
            uvm_pte_batch_end(&w->pte_batch);
            uvm_tlb_batch_single_invalidate(w->tree, &w->push, w->lo, w->hi - w->lo, UVM_PAGE_SIZE_64K, membar);
            uvm_push_end(&w->push);
            uvm_tracker_overwrite_with_push(&w->tracker, &w->push);
            w->open = false;
            w->submitted++;
        }
    }
    else if (w->open) {
        // An error after a push was begun: submit what it holds, so that it can be waited on.
        kvc_writer_end_push(w, true);
    }

    wait_status = uvm_tracker_wait_deinit(&w->tracker);
    return status != NV_OK ? status : wait_status;
}

static uvm_kvc_block_t *kvc_block_find(uvm_kvc_gpu_t *kgpu, NvU64 va)
{
    return radix_tree_lookup(&kgpu->blocks, (unsigned long)(va >> KVC_BLOCK_SHIFT));
}

static NvU32 kvc_block_index(const uvm_kvc_block_t *block, NvU64 va)
{
    return (NvU32)((va - block->start) / KVC_SLOT_SIZE);
}

// Map lock held. A new, empty block for the window at `start`, chained on `created`. Its page
// table may still be initialising (tracked in the tree's tracker).
static NV_STATUS kvc_block_create(uvm_kvc_va_space_t *kvc, uvm_kvc_gpu_t *kgpu, NvU64 start, struct list_head *created)
{
    uvm_kvc_block_t *block;
    NV_STATUS status;
    int ret;

    status = uvm_kvc_charge_meta(kvc, sizeof(*block));
    if (status != NV_OK)
        return status;
    block = uvm_kvmalloc_zero(sizeof(*block));
    if (!block) {
        status = NV_ERR_NO_MEMORY;
        goto error;
    }
    block->start = start;
    status = uvm_page_tree_get_ptes_async(kgpu->tree,
                                          UVM_PAGE_SIZE_64K,
                                          start,
                                          KVC_BLOCK_SIZE,
                                          UVM_PMM_ALLOC_FLAGS_EVICT,
                                          &block->ptes);
    if (status != NV_OK)
        goto error_free;

    ret = radix_tree_insert(&kgpu->blocks, (unsigned long)(start >> KVC_BLOCK_SHIFT), block);
    if (ret != 0) {
        status = NV_ERR_NO_MEMORY;
        uvm_page_tree_put_ptes_async(kgpu->tree, &block->ptes);
        goto error_free;
    }
    list_add_tail(&block->empty_node, created);
    kgpu->nblocks++;
    return NV_OK;

error_free:
    uvm_kvfree(block);
error:
    uvm_kvc_uncharge_meta(kvc, sizeof(*block));
    return status;
}

// Map lock held. Frees a block whose PTEs are clear (or were never written), unlinked from
// whatever list it is on. The caller waits for the page tree before returning to user space.
static void kvc_block_destroy(uvm_kvc_va_space_t *kvc, uvm_kvc_gpu_t *kgpu, uvm_kvc_block_t *block)
{
    UVM_ASSERT(block->mapped == 0);

    radix_tree_delete(&kgpu->blocks, (unsigned long)(block->start >> KVC_BLOCK_SHIFT));
    list_del(&block->empty_node);
    uvm_page_tree_put_ptes_async(kgpu->tree, &block->ptes);
    kgpu->nblocks--;
    uvm_kvfree(block);
    uvm_kvc_uncharge_meta(kvc, sizeof(*block));
}

// Map lock held. Frees empty blocks beyond max(KVC_EMPTY_BLOCKS_MIN, blocks in use).
static void kvc_trim_empty(uvm_kvc_va_space_t *kvc, uvm_kvc_gpu_t *kgpu)
{
    bool trimmed = false;

    while (kgpu->nempty > max_t(NvU64, KVC_EMPTY_BLOCKS_MIN, kgpu->nblocks - kgpu->nempty)) {
        kgpu->nempty--;
        kvc_block_destroy(kvc, kgpu, list_first_entry(&kgpu->empty, uvm_kvc_block_t, empty_node));
        trimmed = true;
    }
    if (trimmed)
        (void)uvm_page_tree_wait(kgpu->tree);
}

static void kvc_block_set_empty(uvm_kvc_gpu_t *kgpu, uvm_kvc_block_t *block)
{
    list_add_tail(&block->empty_node, &kgpu->empty);
    kgpu->nempty++;
}

static void kvc_block_set_used(uvm_kvc_gpu_t *kgpu, uvm_kvc_block_t *block)
{
    list_del_init(&block->empty_node);
    kgpu->nempty--;
}

// Map lock held. Every block the items' PTEs fall in exists afterwards; the new ones are on
// `created` (still empty), and nothing else changed. NO_REPLACE is checked first.
static NV_STATUS kvc_map_prepare(uvm_kvc_va_space_t *kvc,
                                 uvm_kvc_gpu_t *kgpu,
                                 const uvm_kvc_map_item_t *items,
                                 NvU64 count,
                                 NvU32 flags,
                                 struct list_head *created)
{
    uvm_kvc_block_t *block = NULL;
    NV_STATUS status;
    NvU64 i, va;

    for (i = 0; i < count && (flags & UVM_KVC_MAP_FLAGS_NO_REPLACE); i++) {
        for (va = items[i].va; va < items[i].va + (NvU64)items[i].nslots * KVC_SLOT_SIZE; va += KVC_SLOT_SIZE) {
            if (!block || va - block->start >= KVC_BLOCK_SIZE)
                block = kvc_block_find(kgpu, va);
            if (block && (block->mapped & BIT(kvc_block_index(block, va))))
                return NV_ERR_UVM_ADDRESS_IN_USE;
            if (!block)
                va = UVM_ALIGN_DOWN(va, KVC_BLOCK_SIZE) + KVC_BLOCK_SIZE - KVC_SLOT_SIZE;
        }
        block = NULL;
    }

    for (i = 0; i < count; i++) {
        for (va = items[i].va; va < items[i].va + (NvU64)items[i].nslots * KVC_SLOT_SIZE; va += KVC_SLOT_SIZE) {
            NvU64 start = UVM_ALIGN_DOWN(va, KVC_BLOCK_SIZE);

            if (kvc_block_find(kgpu, start))
                continue;
            status = kvc_block_create(kvc, kgpu, start, created);
            if (status != NV_OK)
                return status;
        }
    }
    return NV_OK;
}

static NvU64 kvc_pte_bits(uvm_page_tree_t *tree, NvU64 phys, bool read_only)
{
    return tree->hal->make_pte(UVM_APERTURE_VID,
                               phys,
                               read_only ? UVM_PROT_READ_ONLY : UVM_PROT_READ_WRITE_ATOMIC,
                               UVM_MMU_PTE_FLAGS_CACHED | UVM_MMU_PTE_FLAGS_ACCESS_COUNTERS_DISABLED);
}

// Map lock held. Writes every PTE of the items through `w`; counts the PTEs that replace a
// mapping. Changes no bookkeeping.
static NV_STATUS kvc_map_write(kvc_writer_t *w,
                               uvm_kvc_gpu_t *kgpu,
                               const uvm_kvc_map_item_t *items,
                               NvU64 count,
                               bool read_only,
                               NvU64 *replaced)
{
    uvm_kvc_block_t *block = NULL;
    NV_STATUS status;
    NvU64 i;
    NvU32 sub;

    for (i = 0; i < count; i++) {
        for (sub = 0; sub < items[i].nslots; sub++) {
            NvU64 va = items[i].va + (NvU64)sub * KVC_SLOT_SIZE;
            NvU32 index;

            if (!block || va - block->start >= KVC_BLOCK_SIZE)
                block = kvc_block_find(kgpu, va);
            index = kvc_block_index(block, va);
            *replaced += !!(block->mapped & BIT(index));
            status = kvc_writer_pte(w,
                                    block,
                                    index,
                                    kvc_pte_bits(w->tree, uvm_kvc_slot_phys(items[i].root, items[i].slot + sub), read_only));
            if (status != NV_OK)
                return status;
        }
    }
    return NV_OK;
}

// Map lock held, the items' PTEs written (or possibly written). Records them; the references
// the caller took now belong to the PTEs, and those of the pages they replaced are dropped
// (leaking the roots when the GPU did not confirm the writes).
static void kvc_map_commit(uvm_kvc_va_space_t *kvc,
                           uvm_kvc_gpu_t *kgpu,
                           const uvm_kvc_map_item_t *items,
                           NvU64 count,
                           bool read_only,
                           bool confirmed)
{
    uvm_kvc_block_t *block = NULL;
    NvU64 i;
    NvU32 sub;

    uvm_mutex_lock(&kvc->lock);
    for (i = 0; i < count; i++) {
        for (sub = 0; sub < items[i].nslots; sub++) {
            NvU64 va = items[i].va + (NvU64)sub * KVC_SLOT_SIZE;
            NvU32 index, bit;

            if (!block || va - block->start >= KVC_BLOCK_SIZE)
                block = kvc_block_find(kgpu, va);
            index = kvc_block_index(block, va);
            bit = BIT(index);
            if (block->mapped & bit) {
                NvU32 slot;
                uvm_kvc_root_t *old = uvm_kvc_rec_root_locked(kvc, block->rec[index], &slot);

                old->leaked |= !confirmed;
                uvm_kvc_page_put_locked(kvc, old, slot, 1);
            }
            else if (block->mapped == 0) {
                kvc_block_set_used(kgpu, block);
            }
            block->mapped |= bit;
            block->read_only = read_only ? (block->read_only | bit) : (block->read_only & ~bit);
            block->rec[index] = (items[i].root->id << 5) | (items[i].slot + sub);
        }
    }
    uvm_mutex_unlock(&kvc->lock);
}

// va_space lock held (read), the caller holding one reference per PTE on every item's page
// (items sorted by VA, not overlapping, inside KVC ranges the GPU can address). Maps them all or
// nothing. *consumed says whether the references now belong to PTEs (on success, and after a
// GPU error that left the result unknown) or are still the caller's to drop.
NV_STATUS uvm_kvc_map_items(uvm_kvc_va_space_t *kvc,
                            uvm_gpu_t *gpu,
                            uvm_kvc_map_item_t *items,
                            NvU64 count,
                            NvU32 flags,
                            bool *consumed)
{
    uvm_gpu_va_space_t *gpu_va_space = uvm_gpu_va_space_get(kvc->va_space, gpu);
    bool read_only = flags & UVM_KVC_MAP_FLAGS_READ_ONLY;
    uvm_kvc_gpu_t *kgpu = uvm_kvc_gpu_get_or_create(kvc, gpu);
    uvm_kvc_block_t *block, *next;
    NvU64 replaced = 0;
    LIST_HEAD(created);
    kvc_writer_t w;
    NV_STATUS status, begin_status;

    *consumed = false;
    UVM_ASSERT(gpu_va_space);
    if (!kgpu)
        return NV_ERR_NO_MEMORY;

    uvm_mutex_lock(&kgpu->map_lock);
    // Blocks belong to one GPU VA space: all of them went with the previous one.
    UVM_ASSERT(!kgpu->tree || kgpu->tree == &gpu_va_space->page_tables);
    kgpu->tree = &gpu_va_space->page_tables;

    status = kvc_map_prepare(kvc, kgpu, items, count, flags, &created);
    // The writer also waits for the initialisation of tables made above, even when nothing is
    // written: the call returns with no GPU work of its own pending.
    begin_status = kvc_writer_begin(&w, kgpu->tree);
    if (status == NV_OK)
        status = begin_status;
    if (status == NV_OK)
        status = kvc_map_write(&w, kgpu, items, count, read_only, &replaced);
    // A replaced page may be in use by work still running: the invalidate's membar orders every
    // access through the old translation before the wait completes.
    status = kvc_writer_finish(&w, replaced ? UVM_MEMBAR_GPU : UVM_MEMBAR_NONE, status);

    // New blocks become normal blocks now: used ones leave `created`, empty ones (after a
    // failure) are destroyed below or kept as empty blocks.
    list_for_each_entry_safe(block, next, &created, empty_node) {
        list_del(&block->empty_node);
        kvc_block_set_empty(kgpu, block);
    }

    if (status == NV_OK || w.submitted > 0) {
        kvc_map_commit(kvc, kgpu, items, count, read_only, status == NV_OK);
        *consumed = true;
    }
    kvc_trim_empty(kvc, kgpu);
    uvm_mutex_unlock(&kgpu->map_lock);
    return status;
}

// Map lock held. Clears every mapped PTE of kgpu's blocks in [start, end) through `w`.
static NV_STATUS kvc_clear_span(kvc_writer_t *w, uvm_kvc_gpu_t *kgpu, NvU64 start, NvU64 end)
{
    uvm_kvc_block_t *found[KVC_GANG];
    unsigned long index = (unsigned long)(start >> KVC_BLOCK_SHIFT);
    unsigned int n, i;
    NV_STATUS status;

    while ((n = radix_tree_gang_lookup(&kgpu->blocks, (void **)found, index, KVC_GANG)) > 0) {
        for (i = 0; i < n; i++) {
            uvm_kvc_block_t *block = found[i];
            NvU64 lo = max(start, block->start), hi = min(end, block->start + KVC_BLOCK_SIZE);
            NvU32 first, last, mask;

            if (block->start >= end)
                return NV_OK;
            first = kvc_block_index(block, lo);
            last = kvc_block_index(block, hi - 1);
            mask = (NvU32)(((1ULL << (last - first + 1)) - 1) << first);
            if (!(block->mapped & mask))
                continue;
            // One memset over the span from the first to the last mapped PTE: clearing an
            // already clear PTE in between is harmless and cheaper than more operations.
            first = __ffs(block->mapped & mask);
            last = __fls(block->mapped & mask);
            status = kvc_writer_clear(w, block, first, last - first + 1);
            if (status != NV_OK)
                return status;
        }
        index = (unsigned long)(found[n - 1]->start >> KVC_BLOCK_SHIFT) + 1;
    }
    return NV_OK;
}

// Map lock held, the PTEs of [start, end) cleared (confirmed or not). Drops their references,
// records them clear; with `destroy` frees every block of the span, else keeps emptied blocks.
static void kvc_clear_commit(uvm_kvc_va_space_t *kvc,
                             uvm_kvc_gpu_t *kgpu,
                             NvU64 start,
                             NvU64 end,
                             bool confirmed,
                             bool destroy)
{
    uvm_kvc_block_t *found[KVC_GANG];
    unsigned long index = (unsigned long)(start >> KVC_BLOCK_SHIFT);
    unsigned int n, i;

    while ((n = radix_tree_gang_lookup(&kgpu->blocks, (void **)found, index, KVC_GANG)) > 0) {
        index = (unsigned long)(found[n - 1]->start >> KVC_BLOCK_SHIFT) + 1;
        for (i = 0; i < n; i++) {
            uvm_kvc_block_t *block = found[i];
            NvU64 lo = max(start, block->start), hi = min(end, block->start + KVC_BLOCK_SIZE);
            NvU32 first, last, mask, bits;

            if (block->start >= end)
                return;
            first = kvc_block_index(block, lo);
            last = kvc_block_index(block, hi - 1);
            mask = (NvU32)(((1ULL << (last - first + 1)) - 1) << first);
            bits = block->mapped & mask;
            if (bits) {
                uvm_mutex_lock(&kvc->lock);
                while (bits) {
                    NvU32 e = __ffs(bits), slot;
                    uvm_kvc_root_t *root = uvm_kvc_rec_root_locked(kvc, block->rec[e], &slot);

                    bits &= ~BIT(e);
                    root->leaked |= !confirmed;
                    uvm_kvc_page_put_locked(kvc, root, slot, 1);
                    block->rec[e] = 0;
                }
                uvm_mutex_unlock(&kvc->lock);
                block->mapped &= ~mask;
                block->read_only &= ~mask;
                if (block->mapped == 0)
                    kvc_block_set_empty(kgpu, block);
            }
            if (destroy && block->mapped == 0) {
                kgpu->nempty--;
                kvc_block_destroy(kvc, kgpu, block);
            }
        }
    }
}

// Map lock held. Clears [start, end) on kgpu: one chain of pushes, one invalidate, one wait.
static NV_STATUS kvc_clear(uvm_kvc_va_space_t *kvc, uvm_kvc_gpu_t *kgpu, NvU64 start, NvU64 end, bool destroy)
{
    kvc_writer_t w;
    NV_STATUS status;

    if (!kgpu->tree)
        return NV_OK;

    status = kvc_writer_begin(&w, kgpu->tree);
    if (status == NV_OK)
        status = kvc_clear_span(&w, kgpu, start, end);
    // The unmapped pages may be in use by work still running: the membar after the invalidate
    // orders every access through the old translations before the wait completes. GPU scope:
    // the pages are always the mapping GPU's own vidmem (peer mappings are refused).
    status = kvc_writer_finish(&w, UVM_MEMBAR_GPU, status);

    // Nothing reached the GPU: nothing changed (destroy still has to go on, see below).
    if (status != NV_OK && w.submitted == 0 && !destroy)
        return status;
    kvc_clear_commit(kvc, kgpu, start, end, status == NV_OK, destroy);
    if (destroy)
        (void)uvm_page_tree_wait(kgpu->tree);
    else
        kvc_trim_empty(kvc, kgpu);
    return status;
}

// va_space lock held. Unmaps [start, end) of a KVC range on gpu.
NV_STATUS uvm_kvc_unmap_range_locked(uvm_kvc_va_space_t *kvc, uvm_gpu_t *gpu, NvU64 start, NvU64 end)
{
    uvm_kvc_gpu_t *kgpu = uvm_kvc_gpu_get(kvc, gpu);
    NV_STATUS status;

    if (!kgpu)
        return NV_OK;
    uvm_mutex_lock(&kgpu->map_lock);
    status = kvc_clear(kvc, kgpu, start, end, false);
    uvm_mutex_unlock(&kgpu->map_lock);
    return status;
}

// va_space lock held for write. Clears and frees every block of kgpu in [start, end); a GPU error
// leaks the pages involved instead of returning them. With the whole VA ([0, ~0)), also frees the
// empty blocks and forgets the page tree (the GPU VA space is going away).
void uvm_kvc_blocks_destroy(uvm_kvc_va_space_t *kvc, uvm_kvc_gpu_t *kgpu, NvU64 start, NvU64 end)
{
    uvm_mutex_lock(&kgpu->map_lock);
    (void)kvc_clear(kvc, kgpu, start, end, true);
    if (start == 0 && end == ~0ULL) {
        UVM_ASSERT(kgpu->nblocks == 0 && kgpu->nempty == 0);
        kgpu->tree = NULL;
    }
    uvm_mutex_unlock(&kgpu->map_lock);
}

// Self-test helper (va_space lock held): the GPU physical address of the PTE mapping `va` and the
// PTE KVC wrote there (0 if none).
NV_STATUS uvm_kvc_block_pte(uvm_kvc_va_space_t *kvc,
                            uvm_gpu_t *gpu,
                            NvU64 va,
                            uvm_gpu_phys_address_t *entry,
                            NvU64 *expected)
{
    uvm_kvc_gpu_t *kgpu = uvm_kvc_gpu_get(kvc, gpu);
    NV_STATUS status = NV_ERR_INVALID_ADDRESS;
    uvm_kvc_block_t *block;

    if (!kgpu)
        return status;
    uvm_mutex_lock(&kgpu->map_lock);
    block = kgpu->tree ? kvc_block_find(kgpu, va) : NULL;
    if (block) {
        NvU32 index = kvc_block_index(block, va), slot;

        *entry = uvm_page_table_range_entry_address(kgpu->tree, &block->ptes, index);
        *expected = 0;
        if (block->mapped & BIT(index)) {
            uvm_kvc_root_t *root;

            uvm_mutex_lock(&kvc->lock);
            root = uvm_kvc_rec_root_locked(kvc, block->rec[index], &slot);
            *expected = kvc_pte_bits(kgpu->tree,
                                     uvm_kvc_slot_phys(root, block->rec[index] & (KVC_SLOTS_PER_ROOT - 1)),
                                     block->read_only & BIT(index));
            uvm_mutex_unlock(&kvc->lock);
        }
        status = NV_OK;
    }
    uvm_mutex_unlock(&kgpu->map_lock);
    return status;
}

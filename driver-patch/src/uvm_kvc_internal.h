/*
 * uvm_kvc_internal.h: what the KVC files (uvm_kvc.c, uvm_kvc_pool.c, uvm_kvc_map.c) share with
 * each other and with the self-test (uvm_kvc_test.c) and the user-space harness
 * (driver-patch/harness/). Nothing here is seen by stock UVM code: that is uvm_kvc.h.
 *
 * State of one va_space (uvm_kvc_va_space_t, created on its first KVC ioctl):
 *
 *   pages    2 MiB KERNEL-type PMM roots, 32 slots of 64 KiB each; a page (handle) is 1, 2 or 4
 *            naturally aligned slots of one root. Per-slot state lives in the root: no object per
 *            page. handle = gen << 32 | root_id << 5 | head_slot; root ids come from an idr, gen
 *            from a per-va_space counter, so a slot freed and allocated again gets the same low
 *            32 bits and a new generation (the generation check is exercised all the time).
 *   mappings per GPU, a radix tree of 2 MiB blocks keyed by VA >> 21. A block holds the 32
 *            64 KiB PTEs of its window (one stock page-table range) and, per PTE, which slot it
 *            maps (4 bytes). KVC ranges are 2 MiB aligned, so a block never straddles two
 *            ranges, and no stock mapping shares its page table.
 *   limits   per process (mm) and per GPU across processes (uvm_kvc.c), counted in whole roots;
 *            host bookkeeping counted in bytes per process.
 *
 * Locks, in order (uvm_lock.h): va_space lock > UVM_LOCK_ORDER_KVC_MAP (per GPU: blocks,
 * PTE writes; held across a map's pushes and its wait) > UVM_LOCK_ORDER_KVC (per va_space:
 * roots, slots, refs, pool lists) > page tree, push, PMM. The process table is a leaf spinlock.
 */
#ifndef __UVM_KVC_INTERNAL_H__
#define __UVM_KVC_INTERNAL_H__

#include "uvm_kvc.h"
#include "uvm_lock.h"
#include "uvm_mmu.h"
#include "uvm_pmm_gpu.h"
#include "uvm_push.h"
#include "uvm_tracker.h"

#include <linux/idr.h>
#include <linux/radix-tree.h>

#define KVC_SLOT_SIZE       UVM_PAGE_SIZE_64K
#define KVC_ROOT_SIZE       UVM_CHUNK_SIZE_MAX
#define KVC_SLOTS_PER_ROOT  32
#define KVC_BLOCK_SHIFT     21
#define KVC_BLOCK_SIZE      (1ULL << KVC_BLOCK_SHIFT)
#define KVC_PTES_PER_BLOCK  32
#define KVC_ROOT_ID_MAX     ((1 << 27) - 1)
#define KVC_RANGE_MAX       (1ULL << 52)

// Empty blocks kept per GPU for reuse beyond the number of blocks in use (page tables of a
// request's VA are reused by the next request in the same slot without a PMM round trip).
#define KVC_EMPTY_BLOCKS_MIN 64

// A PTE's page: root id << 5 | slot. 0 is never a valid record (root ids start at 1).
typedef NvU32 uvm_kvc_pte_rec_t;

typedef struct uvm_kvc_proc_struct uvm_kvc_proc_t;
typedef struct uvm_kvc_gpu_struct uvm_kvc_gpu_t;

// A 2 MiB root split into 32 slots. 256 bytes.
typedef struct
{
    struct list_head node;          // gpu->partial or gpu->full
    uvm_gpu_chunk_t *chunk;
    uvm_kvc_gpu_t *kgpu;
    NvU32 id;                       // in kvc->roots
    NvU32 used;                     // slots of a live page, or of a freed page still mapped
    NvU32 live;                     // head slots of live (not freed) pages
    NvU32 dirty;                    // slots that held this va_space's data since zeroing
    NvU32 gen[KVC_SLOTS_PER_ROOT];  // per head slot: the handle's generation
    NvU16 refs[KVC_SLOTS_PER_ROOT]; // per head slot: PTEs mapping the page
    NvU8 order;                     // every page of this root is 1 << order slots
    bool leaked;                    // a PTE clear was not confirmed: never back to PMM
} uvm_kvc_root_t;

// The 32 PTEs of one 2 MiB window of a KVC range on one GPU. 184 bytes.
typedef struct
{
    struct list_head empty_node;    // in kgpu->empty while nothing is mapped
    NvU64 start;
    uvm_page_table_range_t ptes;    // stock page tree range of the 32 entries
    NvU32 mapped;
    NvU32 read_only;
    uvm_kvc_pte_rec_t rec[KVC_PTES_PER_BLOCK];
} uvm_kvc_block_t;

// Per GPU of a va_space. Created on first use, freed with the va_space.
struct uvm_kvc_gpu_struct
{
    uvm_gpu_t *gpu;

    // Under kvc->lock. A root serves one page size (order), so a free page is found in O(1).
    struct list_head partial[3];    // by order: roots with a free page
    struct list_head full;
    NvU64 bytes;                    // roots held

    // Under map_lock
    uvm_mutex_t map_lock;
    uvm_page_tree_t *tree;          // page tree the blocks live in (NULL: no blocks)
    struct radix_tree_root blocks;  // VA >> 21 -> uvm_kvc_block_t
    struct list_head empty;
    NvU64 nblocks;
    NvU64 nempty;
};

typedef struct uvm_kvc_va_space_struct
{
    uvm_va_space_t *va_space;
    uvm_kvc_proc_t *proc;           // the owning process's accounting
    struct mm_struct *owner_mm;     // without va_space_mm: the process allowed to use KVC

    // Protects the pools (kgpu partial/full/bytes) and everything in roots.
    uvm_mutex_t lock;               // UVM_LOCK_ORDER_KVC
    struct idr roots;
    NvU32 gen;
    uvm_kvc_gpu_t *gpus[UVM_ID_MAX_GPUS];

    struct
    {
        bool ignore_is_zero;        // self-test: zero every new root, even PMM-zeroed ones
    } test;
} uvm_kvc_va_space_t;

// One process that used KVC: what it holds, for the caps and uvm_kvc_usage (uvm_kvc.c).
struct uvm_kvc_proc_struct
{
    struct list_head node;          // g_kvc_procs
    struct mm_struct *mm;           // held by uvm_mmgrab: the key stays unique
    pid_t tgid;
    NvU32 users;                    // va_spaces attached
    atomic64_t meta_bytes;
    atomic64_t bytes[UVM_ID_MAX_GPUS];
};

// What MAP needs of one entry after validation: the page, and where.
typedef struct
{
    NvU64 va;
    uvm_kvc_root_t *root;
    NvU32 slot;                     // head slot
    NvU32 nslots;
} uvm_kvc_map_item_t;

// uvm_kvc.c: limits and accounting
bool uvm_kvc_evict_allowed(void);
NV_STATUS uvm_kvc_charge_root(uvm_kvc_va_space_t *kvc, uvm_gpu_t *gpu);
void uvm_kvc_uncharge_root(uvm_kvc_va_space_t *kvc, uvm_gpu_t *gpu);
NV_STATUS uvm_kvc_charge_meta(uvm_kvc_va_space_t *kvc, NvU64 bytes);
void uvm_kvc_uncharge_meta(uvm_kvc_va_space_t *kvc, NvU64 bytes);

// uvm_kvc_pool.c: pages
NV_STATUS uvm_kvc_alloc_pages(uvm_kvc_va_space_t *kvc,
                              uvm_gpu_t *gpu,
                              NvU64 page_size,
                              NvU32 flags,
                              NvU64 count,
                              NvU64 *handles);
NV_STATUS uvm_kvc_free_pages(uvm_kvc_va_space_t *kvc, NvU32 flags, NvU64 count, NvU64 *handles);
NvU64 uvm_kvc_bytes_held(uvm_kvc_va_space_t *kvc, uvm_gpu_t *gpu);
NV_STATUS uvm_kvc_handle_info(uvm_kvc_va_space_t *kvc, NvU64 handle, NvU64 *phys, NvU64 *size, NvU64 *refs);
uvm_kvc_gpu_t *uvm_kvc_gpu_get(uvm_kvc_va_space_t *kvc, uvm_gpu_t *gpu);
uvm_kvc_gpu_t *uvm_kvc_gpu_get_or_create(uvm_kvc_va_space_t *kvc, uvm_gpu_t *gpu);
uvm_kvc_root_t *uvm_kvc_root_lookup_locked(uvm_kvc_va_space_t *kvc, NvU64 handle, NvU32 *slot);
uvm_kvc_root_t *uvm_kvc_rec_root_locked(uvm_kvc_va_space_t *kvc, uvm_kvc_pte_rec_t rec, NvU32 *slot);
NvU64 uvm_kvc_slot_phys(const uvm_kvc_root_t *root, NvU32 slot);
void uvm_kvc_page_put_locked(uvm_kvc_va_space_t *kvc, uvm_kvc_root_t *root, NvU32 slot, NvU32 ptes);
void uvm_kvc_pool_drain(uvm_kvc_va_space_t *kvc, uvm_kvc_gpu_t *kgpu);

// uvm_kvc_map.c: mappings
NV_STATUS uvm_kvc_map_items(uvm_kvc_va_space_t *kvc,
                            uvm_gpu_t *gpu,
                            uvm_kvc_map_item_t *items,
                            NvU64 count,
                            NvU32 flags,
                            bool *consumed);
NV_STATUS uvm_kvc_unmap_range_locked(uvm_kvc_va_space_t *kvc, uvm_gpu_t *gpu, NvU64 start, NvU64 end);
void uvm_kvc_blocks_destroy(uvm_kvc_va_space_t *kvc, uvm_kvc_gpu_t *kgpu, NvU64 start, NvU64 end);
NV_STATUS uvm_kvc_block_pte(uvm_kvc_va_space_t *kvc,
                            uvm_gpu_t *gpu,
                            NvU64 va,
                            uvm_gpu_phys_address_t *entry,
                            NvU64 *expected);

// uvm_kvc.c: what the ioctls do, for the self-test too. The va_space's KVC state if the caller's
// process may use it (NULL and *status set otherwise; with create, made on first use).
uvm_kvc_va_space_t *uvm_kvc_get(uvm_va_space_t *va_space, bool create, NV_STATUS *status);
NV_STATUS uvm_kvc_create_range(uvm_va_space_t *va_space, NvU64 base, NvU64 length);
NV_STATUS uvm_kvc_map(uvm_va_space_t *va_space,
                      const NvProcessorUuid *gpu_uuid,
                      NvU32 flags,
                      UVM_KVC_SCATTER_ENTRY *entries,
                      NvU64 count,
                      NvU64 base);
NV_STATUS uvm_kvc_unmap(uvm_va_space_t *va_space, const NvProcessorUuid *gpu_uuid, NvU64 base, NvU64 length);

#endif // __UVM_KVC_INTERNAL_H__

/*
 * harness.h: the GPU model behind the stubs (stubs.c, gpu_model.c) and what the driver
 * (harness.c) sees of it. See harness_uvm.h for what is stood in for.
 */
#ifndef HARNESS_H
#define HARNESS_H

#include "harness_uvm.h"
#include "uvm_kvc_internal.h"

#define HARNESS_FOREIGN     (-1)                // a vidmem tag: another process's data
#define HARNESS_PATTERN     (-2)                // a vidmem tag: the self-test style fill
#define HARNESS_VIDMEM_BASE (1ULL << 40)
#define HARNESS_CHUNKS      8192                // 16 GiB of "video memory" per GPU at most
#define HARNESS_TABLE_BASE  (1ULL << 60)        // page table entries live at these addresses
#define HARNESS_BAD_USER    0xdead00000000ULL   // user pointers here fault
#define HARNESS_TLB_SIZE    4096
#define HARNESS_PTE_VALID   1ULL
#define HARNESS_PTE_RO      2ULL

enum { HARNESS_FI_ALLOC = 1, HARNESS_FI_GPU = 2, HARNESS_FI_USER = 4 };
enum { HARNESS_ZERO_RANDOM, HARNESS_ZERO_NEVER, HARNESS_ZERO_ALWAYS };

typedef enum
{
    HARNESS_OP_MEMSET,
    HARNESS_OP_PTE_WRITE,
    HARNESS_OP_PTE_CLEAR,
    HARNESS_OP_MEMBAR,
    HARNESS_OP_TLB_INVALIDATE,
    HARNESS_OP_TABLE_INIT,
} harness_op_kind_t;

typedef struct harness_gpu_struct harness_gpu_t;

typedef struct
{
    harness_op_kind_t kind;
    harness_gpu_t *gpu;     // MEMSET, PTE_WRITE: the GPU whose memory it writes or maps
    NvU64 a, b, c;
    harness_table_t *table;
} harness_op_t;

struct harness_push_struct
{
    NvU32 id;
    bool ended, done;
    harness_op_t *ops;
    NvU32 nops, cap, bytes;
    harness_push_t *deps[64];
    NvU32 ndeps;
    harness_push_t *next_all;
};

struct harness_table_struct
{
    NvU64 id;
    uvm_page_tree_t *tree;
    NvU64 start;
    NvU64 entries[32];
    bool ready;
    harness_table_t *hash_next;
};

typedef struct
{
    uvm_gpu_chunk_t chunk;
    int tags[32];       // per 64 KiB: HARNESS_FOREIGN, 0 (zeros), or the owning va_space's id
    int ptes[32];       // valid PTEs pointing at each 64 KiB
    int tlb[32];        // TLB entries pointing at each 64 KiB
    bool live;
} harness_chunk_t;

typedef struct
{
    uvm_page_tree_t *tree;
    NvU64 va;
    NvU64 pte;
} harness_tlb_entry_t;

struct harness_gpu_struct
{
    uvm_gpu_t gpu;
    uvm_gpu_t *self;
    uvm_parent_gpu_t parent;
    harness_chunk_t chunks[HARNESS_CHUNKS];
    int free_list[HARNESS_CHUNKS];
    int nfree, used_chunks, capacity, live_chunks;
    harness_tlb_entry_t tlb[HARNESS_TLB_SIZE];
};

// One open /dev/nvidia-uvm (a struct file is opaque to the KVC files).
typedef struct
{
    uvm_fd_type_t type;
    uvm_va_space_t *va_space;
} harness_file_t;

typedef struct
{
    NvU64 seed, op_index;
    NvU64 interleaving;     // phase 5 under the scheduler: which interleaving (0: free-running)
    int verbose;
    NvU64 pushes, waits, invalidates, pte_writes, pte_clears, tables_got, tables_put;
    NvU64 pmm_allocs, pmm_frees;
    long long kv_bytes, kv_allocs, mm_grabs;
    NvU64 log_lines, error_prints;
    int pmm_zero_mode;
    bool idr_reuse;
    int idr_limit;
} harness_counters_t;

typedef struct
{
    int kinds;          // HARNESS_FI_* that may fail
    long fail_at;       // the count at which to fail (-1: never)
    long count;
    int hit;            // the kind that failed in the current operation, 0 if none
    int ever_hit;       // the kind that failed since the count was reset
    bool gpu_fatal;     // a GPU call failed: every later one fails too
} harness_fi_t;

extern harness_counters_t hc;
extern harness_fi_t hfi;
extern uvm_ce_hal_t harness_ce_hal;

void harness_fail(const char *fmt, ...) __attribute__((noreturn, format(printf, 1, 2)));
bool harness_fi(int kind);
NvU64 harness_rand(void);
void harness_world_lock(void);
void harness_world_unlock(void);
// The serializing scheduler (stubs.c): threads 0..nthreads-1 that enter it run one at a time,
// handing over at seeded lock releases; start before creating them, stop after joining them.
void harness_sched_start(int nthreads, NvU64 seed, bool adversarial);
void harness_sched_enter(int me);
void harness_sched_exit(void);
void harness_sched_stop(void);
void harness_param_set(const char *name, unsigned int value);
int harness_locks_held(void);

// gpu_model.c
harness_chunk_t *harness_chunk_at(harness_gpu_t *hg, NvU64 address);
harness_table_t *harness_table_new(uvm_page_tree_t *tree, NvU64 start);
harness_table_t *harness_table_find(uvm_page_tree_t *tree, NvU64 start);
harness_table_t *harness_table_by_id(NvU64 id);
void harness_table_free(harness_table_t *t);
void harness_tlb_drop(harness_gpu_t *hg, NvU64 start, NvU64 end);
void harness_gpu_execute(harness_op_t *op);
void harness_check_chunk_unreferenced(harness_gpu_t *hg, NvU64 address);
void harness_check_no_pending_work(void);
void harness_free_pushes(void);
void harness_tracker_prune(uvm_tracker_t *t);
NvU64 harness_pte_make(uvm_aperture_t aperture, NvU64 address, uvm_prot_t prot, NvU64 flags);
bool harness_gpu_access(harness_gpu_t *hg, uvm_page_tree_t *tree, NvU64 va, bool write, int owner, int *tag);
NvU64 harness_pte_at(uvm_page_tree_t *tree, NvU64 va);

#endif // HARNESS_H

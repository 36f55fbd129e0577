/*
 * harness_uvm.h: user-space stand-ins for the parts of nvidia-uvm and the Linux kernel that the
 * KVC files (driver-patch/src/uvm_kvc*.c) use, so that those files compile unchanged and run
 * under AddressSanitizer and UBSan (make driver-harness). Every stock header name the KVC files
 * include (uvm_common.h, linux/idr.h, ...) is a one-line file in include/ that includes this.
 *
 * Written from the APIs' documented contracts (uvm_mmu.h, uvm_pte_batch.h, uvm_push.h,
 * uvm_pmm_gpu.h, ...), not from their code. The implementations (stubs.c) keep a model of the
 * GPU: page tables with 64 KiB entries, pushes that run only when waited on, a TLB, and a tag
 * per 64 KiB of video memory saying whose data it holds. They check lock order, count pushes,
 * invalidates, waits and kernel memory, and fail the Nth fallible call on request.
 */
#ifndef HARNESS_UVM_H
#define HARNESS_UVM_H

#include <errno.h>
#include <pthread.h>
#include <limits.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "uvm_kvc_ioctl.h"

typedef uint16_t NvU16;
typedef int pid_t;

// --- NV_STATUS (values of nvstatuscodes.h, restated by the ABI header) -----------------------
#define NV_OK                              UVM_KVC_STATUS_NV_OK
#define NV_ERR_ILLEGAL_ACTION              UVM_KVC_STATUS_NV_ERR_ILLEGAL_ACTION
#define NV_ERR_IN_USE                      UVM_KVC_STATUS_NV_ERR_IN_USE
#define NV_ERR_INSUFFICIENT_RESOURCES      UVM_KVC_STATUS_NV_ERR_INSUFFICIENT_RESOURCES
#define NV_ERR_INSUFFICIENT_PERMISSIONS    UVM_KVC_STATUS_NV_ERR_INSUFFICIENT_PERMISSIONS
#define NV_ERR_INVALID_ADDRESS             UVM_KVC_STATUS_NV_ERR_INVALID_ADDRESS
#define NV_ERR_INVALID_ARGUMENT            UVM_KVC_STATUS_NV_ERR_INVALID_ARGUMENT
#define NV_ERR_INVALID_DEVICE              UVM_KVC_STATUS_NV_ERR_INVALID_DEVICE
#define NV_ERR_INVALID_FLAGS               UVM_KVC_STATUS_NV_ERR_INVALID_FLAGS
#define NV_ERR_INVALID_LIMIT               UVM_KVC_STATUS_NV_ERR_INVALID_LIMIT
#define NV_ERR_INVALID_OBJECT_HANDLE       UVM_KVC_STATUS_NV_ERR_INVALID_OBJECT_HANDLE
#define NV_ERR_NO_MEMORY                   UVM_KVC_STATUS_NV_ERR_NO_MEMORY
#define NV_ERR_NOT_SUPPORTED               UVM_KVC_STATUS_NV_ERR_NOT_SUPPORTED
#define NV_ERR_OUT_OF_RANGE                UVM_KVC_STATUS_NV_ERR_OUT_OF_RANGE
#define NV_ERR_UVM_ADDRESS_IN_USE          UVM_KVC_STATUS_NV_ERR_UVM_ADDRESS_IN_USE
#define NV_ERR_INVALID_STATE               0x00000040
#define NV_ERR_RC_ERROR                    0x00000063
const char *nvstatusToString(NV_STATUS status);

// --- kernel basics ---------------------------------------------------------------------------
#define __user
#define PAGE_SIZE 4096
#define S_IRUGO 0444
#define S_IWUSR 0200
#define BIT(n) (1u << (n))
#define ARRAY_SIZE(a) (sizeof(a) / sizeof((a)[0]))
#define READ_ONCE(x) __atomic_load_n(&(x), __ATOMIC_SEQ_CST)
#define cmpxchg(ptr, old, new_) ({ __typeof__(*(ptr)) __o = (old); \
    __atomic_compare_exchange_n((ptr), &__o, (new_), false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST); __o; })
#define min(a, b) ((a) < (b) ? (a) : (b))
#define max(a, b) ((a) > (b) ? (a) : (b))
#define min_t(t, a, b) ((t)(a) < (t)(b) ? (t)(a) : (t)(b))
#define max_t(t, a, b) ((t)(a) > (t)(b) ? (t)(a) : (t)(b))
#define IS_ALIGNED(x, a) (((x) & ((__typeof__(x))(a) - 1)) == 0)
#define UVM_ALIGN_DOWN(x, a) ((x) & ~((__typeof__(x))(a) - 1))
#define BUILD_BUG_ON(cond) _Static_assert(!(cond), #cond)
#define ilog2(n) (63 - __builtin_clzll((unsigned long long)(n)))
#define __ffs(x) ((unsigned long)__builtin_ctzl(x))
#define __fls(x) ((unsigned long)(63 - __builtin_clzl(x)))
#define scnprintf(buf, size, ...) harness_scnprintf((buf), (size), __VA_ARGS__)
int harness_scnprintf(char *buf, size_t size, const char *fmt, ...);
#define container_of(ptr, type, member) ((type *)((char *)(ptr) - offsetof(type, member)))

void harness_assert_fail(const char *file, int line, const char *what);
#define UVM_ASSERT(cond) do { if (!(cond)) harness_assert_fail(__FILE__, __LINE__, #cond); } while (0)
#define UVM_ERR_PRINT(fmt, ...) harness_log(1, fmt, ##__VA_ARGS__)
#define UVM_DBG_PRINT_RL(fmt, ...) harness_log(0, fmt, ##__VA_ARGS__)
void harness_log(int error, const char *fmt, ...);

struct list_head { struct list_head *next, *prev; };
#define LIST_HEAD_INIT(name) { &(name), &(name) }
#define LIST_HEAD(name) struct list_head name = LIST_HEAD_INIT(name)
static inline void INIT_LIST_HEAD(struct list_head *l) { l->next = l; l->prev = l; }
static inline void __list_add(struct list_head *n, struct list_head *p, struct list_head *x)
{ x->prev = n; n->next = x; n->prev = p; p->next = n; }
static inline void list_add(struct list_head *n, struct list_head *h) { __list_add(n, h, h->next); }
static inline void list_add_tail(struct list_head *n, struct list_head *h) { __list_add(n, h->prev, h); }
static inline void list_del(struct list_head *e)
{ e->next->prev = e->prev; e->prev->next = e->next; e->next = (void *)0x100; e->prev = (void *)0x122; }
static inline void list_del_init(struct list_head *e)
{ e->next->prev = e->prev; e->prev->next = e->next; INIT_LIST_HEAD(e); }
static inline void list_move(struct list_head *e, struct list_head *h) { list_del_init(e); list_add(e, h); }
static inline bool list_empty(const struct list_head *h) { return h->next == h; }
#define list_entry(p, t, m) container_of(p, t, m)
#define list_first_entry(h, t, m) list_entry((h)->next, t, m)
#define list_first_entry_or_null(h, t, m) (list_empty(h) ? NULL : list_first_entry(h, t, m))
#define list_for_each_entry(p, h, m) \
    for (p = list_entry((h)->next, __typeof__(*p), m); &p->m != (h); p = list_entry(p->m.next, __typeof__(*p), m))
#define list_for_each_entry_safe(p, n, h, m) \
    for (p = list_entry((h)->next, __typeof__(*p), m), n = list_entry(p->m.next, __typeof__(*p), m); \
         &p->m != (h); p = n, n = list_entry(n->m.next, __typeof__(*n), m))

typedef struct { long long counter; } atomic64_t;
static inline long long atomic64_read(atomic64_t *a) { return __atomic_load_n(&a->counter, __ATOMIC_SEQ_CST); }
static inline void atomic64_add(long long v, atomic64_t *a) { __atomic_add_fetch(&a->counter, v, __ATOMIC_SEQ_CST); }
static inline void atomic64_sub(long long v, atomic64_t *a) { __atomic_sub_fetch(&a->counter, v, __ATOMIC_SEQ_CST); }
static inline long long atomic64_add_return(long long v, atomic64_t *a)
{ return __atomic_add_fetch(&a->counter, v, __ATOMIC_SEQ_CST); }

// Spinlocks: leaf locks; sleeping (allocating) while one is held is reported.
typedef struct { pthread_mutex_t mutex; } spinlock_t;
#define DEFINE_SPINLOCK(name) spinlock_t name = { PTHREAD_MUTEX_INITIALIZER }
void spin_lock(spinlock_t *lock);
void spin_unlock(spinlock_t *lock);

struct mm_struct { int id; };
struct task_struct { struct mm_struct *mm; int tgid; };
extern __thread struct task_struct *harness_current;
#define current harness_current
void uvm_mmgrab(struct mm_struct *mm);
void uvm_mmdrop(struct mm_struct *mm);

struct file;

struct kernel_param;
struct kernel_param_ops
{
    int (*set)(const char *value, const struct kernel_param *kp);
    int (*get)(char *buffer, const struct kernel_param *kp);
};
// Module parameters register themselves, so that the harness can set them by name.
void harness_param_register(const char *name, void *addr, size_t size);
#define module_param(name, type, perm) \
    static __attribute__((constructor)) void harness_register_##name(void) \
    { harness_param_register(#name, &name, sizeof(name)); }
#define module_param_cb(name, ops, arg, perm) \
    const struct kernel_param_ops *harness_param_ops_##name = (ops)
#define MODULE_PARM_DESC(name, desc) \
    static __attribute__((unused)) const char *harness_param_desc_##name = desc

void get_random_bytes(void *buf, int nbytes);
void sort(void *base, size_t num, size_t size, int (*cmp)(const void *, const void *), void (*swap)(void *, void *, int));
unsigned long copy_from_user(void *to, const void __user *from, unsigned long n);
unsigned long copy_to_user(void __user *to, const void *from, unsigned long n);

// idr: int ids -> pointers (real radix semantics are not needed: a sorted table)
struct idr { void **ptrs; int cap; int next; };
void idr_init(struct idr *idr);
int idr_alloc_cyclic(struct idr *idr, void *ptr, int start, int end, int gfp);
void *idr_find(struct idr *idr, unsigned long id);
void *idr_remove(struct idr *idr, unsigned long id);
bool idr_is_empty(struct idr *idr);
void idr_destroy(struct idr *idr);

// radix tree: unsigned long -> pointer, ordered gang lookup
struct radix_tree_root { void *impl; int gfp; };
#define INIT_RADIX_TREE(root, mask) do { (root)->impl = NULL; (root)->gfp = (mask); } while (0)
int radix_tree_insert(struct radix_tree_root *root, unsigned long index, void *item);
void *radix_tree_lookup(struct radix_tree_root *root, unsigned long index);
void *radix_tree_delete(struct radix_tree_root *root, unsigned long index);
unsigned int radix_tree_gang_lookup(struct radix_tree_root *root, void **results, unsigned long first, unsigned int max_items);
#define NV_UVM_GFP_FLAGS 1

// --- UVM basics ------------------------------------------------------------------------------
#define UVM_PAGE_SIZE_64K  (64ULL << 10)
#define UVM_PAGE_SIZE_2M   (2ULL << 20)
#define UVM_CHUNK_SIZE_MAX UVM_PAGE_SIZE_2M
#define UVM_TEST_IOCTL_BASE(i) UVM_IOCTL_BASE(200 + (i))
#define UVM_MAX_PUSH_SIZE (128 * 1024)
#define UVM_ID_MAX_GPUS 8

typedef enum
{
    UVM_LOCK_ORDER_INVALID = 0,
    UVM_LOCK_ORDER_VA_SPACE = 10,
    UVM_LOCK_ORDER_EXT_RANGE_TREE = 20,
    UVM_LOCK_ORDER_KVC_MAP = 21,
    UVM_LOCK_ORDER_KVC = 22,
    UVM_LOCK_ORDER_VA_BLOCK = 30,
    UVM_LOCK_ORDER_PAGE_TREE = 40,
    UVM_LOCK_ORDER_PUSH = 50,
    UVM_LOCK_ORDER_PMM = 60,
    UVM_LOCK_ORDER_LEAF = 100,
} uvm_lock_order_t;

// Real locks (the harness runs two threads in one phase); each thread records what it holds.
typedef struct { int order; pthread_mutex_t mutex; pthread_rwlock_t rw; } uvm_mutex_t;
typedef uvm_mutex_t uvm_rw_semaphore_t;
void uvm_mutex_init(uvm_mutex_t *m, uvm_lock_order_t order);
void uvm_mutex_lock(uvm_mutex_t *m);
void uvm_mutex_unlock(uvm_mutex_t *m);
void harness_assert_locked(uvm_mutex_t *m, bool write, const char *file, int line);
#define uvm_assert_mutex_locked(m) harness_assert_locked((m), true, __FILE__, __LINE__)
#define uvm_assert_rwsem_locked(m) harness_assert_locked((m), false, __FILE__, __LINE__)
#define uvm_assert_rwsem_locked_write(m) harness_assert_locked((m), true, __FILE__, __LINE__)

void *uvm_kvmalloc(size_t size);
void *uvm_kvmalloc_zero(size_t size);
void uvm_kvfree(void *p);

typedef enum { UVM_APERTURE_VID = 8, UVM_APERTURE_SYS = 9 } uvm_aperture_t;
typedef struct { NvU64 address; uvm_aperture_t aperture; } uvm_gpu_phys_address_t;
typedef struct { NvU64 address; bool is_virtual; uvm_aperture_t aperture; } uvm_gpu_address_t;
typedef enum { UVM_MEMBAR_NONE, UVM_MEMBAR_GPU, UVM_MEMBAR_SYS } uvm_membar_t;
typedef enum { UVM_PROT_NONE, UVM_PROT_READ_ONLY, UVM_PROT_READ_WRITE, UVM_PROT_READ_WRITE_ATOMIC } uvm_prot_t;
#define UVM_MMU_PTE_FLAGS_CACHED 1
#define UVM_MMU_PTE_FLAGS_ACCESS_COUNTERS_DISABLED 2
typedef enum { UVM_PMM_ALLOC_FLAGS_NONE = 0, UVM_PMM_ALLOC_FLAGS_EVICT = 1 } uvm_pmm_alloc_flags_t;
typedef enum { UVM_CHANNEL_TYPE_GPU_INTERNAL = 1 } uvm_channel_type_t;
typedef enum { UVM_PUSH_FLAG_NEXT_MEMBAR_NONE = 1, UVM_PUSH_FLAG_CE_NEXT_PIPELINED = 2 } uvm_push_flag_t;

static inline uvm_gpu_phys_address_t uvm_gpu_phys_address(uvm_aperture_t aperture, NvU64 address)
{ uvm_gpu_phys_address_t a = { address, aperture }; return a; }

typedef struct harness_push_struct harness_push_t;
typedef struct uvm_gpu_struct uvm_gpu_t;

typedef struct { NvU32 count; harness_push_t *pushes[64]; } uvm_tracker_t;
#define UVM_TRACKER_INIT() { 0 }
void uvm_tracker_init(uvm_tracker_t *t);

typedef struct
{
    harness_push_t *impl;
    uvm_gpu_t *gpu;
    NvU32 flags;
} uvm_push_t;

typedef struct { uvm_push_t *push; NvU64 last_pte; bool open; } uvm_pte_batch_t;

typedef struct uvm_gpu_chunk_struct { NvU64 address; bool is_zero; int id; } uvm_gpu_chunk_t;
typedef struct { uvm_gpu_t *gpu; } uvm_pmm_gpu_t;

typedef struct { NvU64 (*make_pte)(uvm_aperture_t aperture, NvU64 address, uvm_prot_t prot, NvU64 flags); } uvm_mmu_mode_hal_t;
typedef struct harness_table_struct harness_table_t;
typedef struct
{
    harness_table_t *table;
    NvU32 start_index;
    NvU32 entry_count;
    NvU64 page_size;
} uvm_page_table_range_t;
typedef struct uvm_page_tree_struct
{
    uvm_gpu_t *gpu;
    uvm_mmu_mode_hal_t *hal;
    NvU64 big_page_size;
    uvm_mutex_t lock;
    uvm_tracker_t tracker;
} uvm_page_tree_t;

typedef struct
{
    void (*memset_8)(uvm_push_t *push, uvm_gpu_address_t dst, NvU64 value, size_t size);
} uvm_ce_hal_t;

typedef struct
{
    uvm_ce_hal_t *ce_hal;
    bool sparse_mappings_supported;
} uvm_parent_gpu_t;

typedef struct { int value; } uvm_gpu_id_t;

struct uvm_gpu_struct
{
    uvm_gpu_id_t id;
    uvm_parent_gpu_t *parent;
    uvm_pmm_gpu_t pmm;
    void *channel_manager;
    struct { NvU64 size; } mem_info;
    NvProcessorUuid uuid;
    char name[16];
};
static inline size_t uvm_id_gpu_index(uvm_gpu_id_t id) { return (size_t)id.value; }
static inline const char *uvm_gpu_name(uvm_gpu_t *gpu) { return gpu->name; }
bool uvm_gpu_can_address(uvm_gpu_t *gpu, NvU64 addr, NvU64 size);

typedef struct { uvm_page_tree_t page_tables; uvm_gpu_t *gpu; } uvm_gpu_va_space_t;

typedef struct { NvU64 start; NvU64 end; } uvm_range_tree_node_t;
typedef struct { uvm_range_tree_node_t node; bool kvc_owned; struct uvm_va_space_struct *va_space; } harness_ext_range_t;

struct uvm_kvc_va_space_struct;
typedef struct uvm_va_space_struct
{
    uvm_rw_semaphore_t lock;
    struct uvm_kvc_va_space_struct *kvc;
    struct { struct mm_struct *mm; } va_space_mm;
    bool mm_enabled;
    uvm_gpu_t *gpus[UVM_ID_MAX_GPUS];
    uvm_gpu_va_space_t *gpu_va_spaces[UVM_ID_MAX_GPUS];
    harness_ext_range_t *ranges[128];
    int id;
} uvm_va_space_t;

typedef enum { UVM_FD_UNINITIALIZED, UVM_FD_VA_SPACE, UVM_FD_MM } uvm_fd_type_t;
uvm_va_space_t *uvm_va_space_get(struct file *filp);
uvm_fd_type_t uvm_fd_type(struct file *filp, void **ptr);
void uvm_va_space_down_read(uvm_va_space_t *va_space);
void uvm_va_space_up_read(uvm_va_space_t *va_space);
void uvm_va_space_down_write(uvm_va_space_t *va_space);
void uvm_va_space_up_write(uvm_va_space_t *va_space);
bool uvm_va_space_mm_enabled(uvm_va_space_t *va_space);
struct mm_struct *uvm_va_space_mm_or_current_retain_lock(uvm_va_space_t *va_space);
void uvm_va_space_mm_or_current_release_unlock(uvm_va_space_t *va_space, struct mm_struct *mm);
uvm_gpu_t *uvm_va_space_get_gpu_by_uuid(uvm_va_space_t *va_space, const NvProcessorUuid *uuid);
uvm_gpu_t *uvm_va_space_get_gpu_by_uuid_with_gpu_va_space(uvm_va_space_t *va_space, const NvProcessorUuid *uuid);
uvm_gpu_va_space_t *uvm_gpu_va_space_get(uvm_va_space_t *va_space, uvm_gpu_t *gpu);
bool uvm_api_range_invalid_64k(NvU64 base, NvU64 length);

NV_STATUS uvm_pmm_gpu_alloc_kernel(uvm_pmm_gpu_t *pmm, size_t n, NvU64 size, uvm_pmm_alloc_flags_t flags,
                                   uvm_gpu_chunk_t **chunks, uvm_tracker_t *out_tracker);
void uvm_pmm_gpu_free(uvm_pmm_gpu_t *pmm, uvm_gpu_chunk_t *chunk, uvm_tracker_t *tracker);

uvm_gpu_address_t uvm_gpu_address_copy(uvm_gpu_t *gpu, uvm_gpu_phys_address_t phys);
NV_STATUS harness_push_begin(void *manager, uvm_tracker_t *tracker, uvm_push_t *push);
#define uvm_push_begin(manager, type, push, ...) harness_push_begin((manager), NULL, (push))
#define uvm_push_begin_acquire(manager, type, tracker, push, ...) harness_push_begin((manager), (tracker), (push))
void uvm_push_end(uvm_push_t *push);
NV_STATUS uvm_push_end_and_wait(uvm_push_t *push);
void uvm_push_set_flag(uvm_push_t *push, uvm_push_flag_t flag);
bool uvm_push_has_space(uvm_push_t *push, NvU32 free_space);
NV_STATUS uvm_tracker_add_push_safe(uvm_tracker_t *tracker, uvm_push_t *push);
NV_STATUS uvm_tracker_add_tracker_safe(uvm_tracker_t *dst, uvm_tracker_t *src);
void uvm_tracker_overwrite_with_push(uvm_tracker_t *tracker, uvm_push_t *push);
NV_STATUS uvm_tracker_wait_deinit(uvm_tracker_t *tracker);

void uvm_pte_batch_begin(uvm_push_t *push, uvm_pte_batch_t *batch);
void uvm_pte_batch_end(uvm_pte_batch_t *batch);
void uvm_pte_batch_write_pte(uvm_pte_batch_t *batch, uvm_gpu_phys_address_t pte, NvU64 pte_bits, NvU32 entry_size);
void uvm_pte_batch_clear_ptes(uvm_pte_batch_t *batch, uvm_gpu_phys_address_t first_pte, NvU64 empty_pte_bits,
                              NvU32 entry_size, NvU32 entry_count);
void uvm_tlb_batch_single_invalidate(uvm_page_tree_t *tree, uvm_push_t *push, NvU64 start, NvU64 size,
                                     NvU64 page_sizes, uvm_membar_t tlb_membar);
uvm_gpu_phys_address_t uvm_page_table_range_entry_address(uvm_page_tree_t *tree, uvm_page_table_range_t *range,
                                                          size_t entry_index);
static inline NvU32 uvm_mmu_pte_size(uvm_page_tree_t *tree, NvU64 page_size) { return 8; }
NV_STATUS uvm_page_tree_get_ptes_async(uvm_page_tree_t *tree, NvU64 page_size, NvU64 start, NvU64 size,
                                       uvm_pmm_alloc_flags_t pmm_flags, uvm_page_table_range_t *range);
void uvm_page_tree_put_ptes_async(uvm_page_tree_t *tree, uvm_page_table_range_t *range);
NV_STATUS uvm_page_tree_wait(uvm_page_tree_t *tree);

// --- what uvm_kvc_compat.h gives the KVC files -----------------------------------------------
typedef harness_ext_range_t uvm_kvc_ext_range_t;
uvm_kvc_ext_range_t *uvm_kvc_ext_range_find(uvm_va_space_t *va_space, NvU64 addr);
NV_STATUS uvm_kvc_ext_range_create(uvm_va_space_t *va_space, struct mm_struct *mm, NvU64 start, NvU64 length,
                                   uvm_kvc_ext_range_t **out);
#define uvm_kvc_ext_range_node(range)        (&(range)->node)
#define uvm_kvc_ext_range_owned(range)       ((range)->kvc_owned)
#define uvm_kvc_ext_range_va_space(range)    ((range)->va_space)
#define uvm_kvc_fd_is_test(type)             (false)
#define uvm_kvc_conf_computing_enabled(gpu)  (false)
#define uvm_kvc_sriov_heavy(gpu)             (false)
#define uvm_kvc_sparse_supported(gpu)        ((gpu)->parent->sparse_mappings_supported)

#endif // HARNESS_UVM_H

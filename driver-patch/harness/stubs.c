/*
 * stubs.c: the UVM and kernel APIs the KVC files call, over a model of a GPU (see harness_uvm.h).
 *
 * The model, in one paragraph: video memory is PMM chunks of 2 MiB with a tag per 64 KiB saying
 * whose data it holds (HARNESS_FOREIGN: another process's, 0: zeros, n > 0: va_space n's).
 * Page tables are 32-entry tables per 2 MiB window, created by get_ptes with an initialisation
 * push of their own. A push records operations (memsets, PTE writes and clears, TLB invalidates)
 * and runs them only when something waits for it (or for a push that acquired it). GPU accesses
 * go through a TLB that only an invalidate empties. Checks made as operations run: no PTE write
 * into a table before its initialisation ran, no valid PTE ever points at FOREIGN data, no
 * memset or PTE into freed memory, and a chunk is freed only when no PTE, no TLB entry and no
 * pending operation refers to it.
 */
#define _GNU_SOURCE     // pthread_setaffinity_np, sched_getcpu (the scheduler's pinning)
#include "harness.h"

#include <pthread.h>
#include <sched.h>

struct task_struct harness_default_task = { NULL, 1 };
__thread struct task_struct *harness_current = &harness_default_task;

// ---------------------------------------------------------------------------------------------
// A serializing scheduler for the harness's threads (phase 5, taking turns)
//
// Free-running threads meet in few of the possible interleavings, and in which ones depends on
// the machine's load: a race the checks can see may show once in thousands of runs. With the
// scheduler on (harness_sched_start), the threads that entered it run one at a time, handing
// over only at lock releases (and whenever a lock they want is held by another), so only the
// running thread touches shared state: an interleaving is a function of the seed and replays
// exactly. Where a thread hands over is drawn per thread from the seed, in the spirit of the
// races worth finding: a thread with GPU work queued and not yet waited for (between a push's
// begin and the wait for it) is stopped often, and the other one then runs on, typically to the
// end of an ioctl, so that whole ioctls of one thread run while the other has work in flight.

#define SCHED_MAX_THREADS 4
#define SCHED_STALLS_MAX  100000   // handovers in a row without any lock taken: a deadlock

static struct
{
    pthread_mutex_t mutex;
    pthread_cond_t cond;
    int nthreads;               // threads that will enter; 0: scheduler off
    int turn;                   // the one that may run
    bool exited[SCHED_MAX_THREADS];
    NvU64 rng;
    // Per thread: it hands over at a lock release with probability 1 / n (0: never), n from
    // queued (work queued), ioctl_end (nothing queued, the va_space lock released) or idle.
    NvU32 queued[SCHED_MAX_THREADS], ioctl_end[SCHED_MAX_THREADS], idle[SCHED_MAX_THREADS];
    NvU64 stalls;
    int cpu;                    // the CPU every thread runs on (-1: any)
} sched = { PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER };
static __thread int sched_me = -1;   // this thread's index while it takes part
static __thread bool sched_queued;   // it began a push and has not waited since

static NvU64 sched_rand(void)
{
    NvU64 z = (sched.rng += 0x9e3779b97f4a7c15ULL);

    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

// With `adversarial`, no draw: a thread with work queued hands over at every release, and one
// without runs to the end of its ioctl.
void harness_sched_start(int nthreads, NvU64 seed, bool adversarial)
{
    int t;

    if (nthreads < 1 || nthreads > SCHED_MAX_THREADS)
        harness_fail("scheduler for %d threads", nthreads);
    memset(sched.exited, 0, sizeof(sched.exited));
    sched.nthreads = nthreads;
    sched.turn = 0;
    sched.rng = seed;
    sched.stalls = 0;
    sched.cpu = sched_getcpu();
    for (t = 0; t < nthreads; t++) {
        sched.queued[t] = adversarial ? 1 : 1u << (sched_rand() % 3);      // 1, 2, 4
        sched.ioctl_end[t] = adversarial ? 1 : 1u << (sched_rand() % 2);   // 1, 2
        sched.idle[t] = adversarial ? 0 : 16u << (sched_rand() % 5);       // 16 .. 256
    }
}

void harness_sched_stop(void)
{
    sched.nthreads = 0;
}

// sched.mutex held: the next thread after `me` that has not exited (me if none).
static int sched_next(int me)
{
    int k, t;

    for (k = 1; k <= sched.nthreads; k++) {
        t = (me + k) % sched.nthreads;
        if (!sched.exited[t])
            return t;
    }
    return me;
}

// The running thread gives the turn to the next one and waits for it to come back.
static void sched_hand_over(void)
{
    pthread_mutex_lock(&sched.mutex);
    sched.turn = sched_next(sched_me);
    pthread_cond_broadcast(&sched.cond);
    while (sched.turn != sched_me)
        pthread_cond_wait(&sched.cond, &sched.mutex);
    pthread_mutex_unlock(&sched.mutex);
}

void harness_sched_enter(int me)
{
    if (!sched.nthreads)
        return;
    if (me < 0 || me >= sched.nthreads)
        harness_fail("thread %d enters a scheduler of %d", me, sched.nthreads);
    // One runs at a time: on one CPU a handover costs a few microseconds, across CPUs several
    // times that (a wakeup of an idle core). Where pinning is refused, it only runs slower.
    if (sched.cpu >= 0) {
        cpu_set_t cpus;

        CPU_ZERO(&cpus);
        CPU_SET(sched.cpu, &cpus);
        (void)pthread_setaffinity_np(pthread_self(), sizeof(cpus), &cpus);
    }
    sched_me = me;
    sched_queued = false;
    pthread_mutex_lock(&sched.mutex);
    while (sched.turn != me)
        pthread_cond_wait(&sched.cond, &sched.mutex);
    pthread_mutex_unlock(&sched.mutex);
}

void harness_sched_exit(void)
{
    if (sched_me < 0)
        return;
    pthread_mutex_lock(&sched.mutex);
    sched.exited[sched_me] = true;
    sched.turn = sched_next(sched_me);
    pthread_cond_broadcast(&sched.cond);
    pthread_mutex_unlock(&sched.mutex);
    sched_me = -1;
}

// A lock was released (`ioctl_end`: the va_space lock): maybe another thread runs now.
static void sched_point(bool ioctl_end)
{
    NvU32 n;

    if (sched_me < 0)
        return;
    n = sched_queued ? sched.queued[sched_me] : ioctl_end ? sched.ioctl_end[sched_me] : sched.idle[sched_me];
    if (n && sched_rand() % n == 0)
        sched_hand_over();
}

// The lock `what` is held by another thread: that one runs until it lets go.
static void sched_blocked(const char *what)
{
    bool alone;

    pthread_mutex_lock(&sched.mutex);
    alone = sched_next(sched_me) == sched_me;
    pthread_mutex_unlock(&sched.mutex);
    if (alone)
        harness_fail("%s is held by a thread that exited", what);
    if (++sched.stalls > SCHED_STALLS_MAX)
        harness_fail("deadlock: the threads wait for each other's locks (%s)", what);
    sched_hand_over();
}

// Takes a lock: blocking when free-running, else trying and handing over until it is free.
#define SCHED_ACQUIRE(blocking, trylock, lock, what) do {      \
        if (sched_me < 0) {                                    \
            blocking(lock);                                    \
            break;                                             \
        }                                                      \
        while (trylock(lock) != 0)                             \
            sched_blocked(what);                               \
        sched.stalls = 0;                                      \
    } while (0)

// The model GPU, PMM, pushes and counters are shared by the harness's threads: one recursive lock
// around each stand-in that touches them (never held across a call into KVC code).
static pthread_mutex_t world;
static pthread_once_t world_once = PTHREAD_ONCE_INIT;
static __thread int world_depth;

static void world_init(void)
{
    pthread_mutexattr_t attr;

    pthread_mutexattr_init(&attr);
    pthread_mutexattr_settype(&attr, PTHREAD_MUTEX_RECURSIVE);
    pthread_mutex_init(&world, &attr);
}

void harness_world_lock(void)
{
    pthread_once(&world_once, world_init);
    SCHED_ACQUIRE(pthread_mutex_lock, pthread_mutex_trylock, &world, "the model's lock");
    world_depth++;
}

void harness_world_unlock(void)
{
    pthread_mutex_unlock(&world);
    if (--world_depth == 0)
        sched_point(false);
}

harness_counters_t hc;
harness_fi_t hfi = { .fail_at = -1 };

// ---------------------------------------------------------------------------------------------
// failures and reporting

void harness_fail(const char *fmt, ...)
{
    va_list ap;

    fprintf(stderr, "driver-harness: FAIL (seed %llu, op %llu", (unsigned long long)hc.seed, (unsigned long long)hc.op_index);
    if (hc.interleaving)
        fprintf(stderr, ", interleaving %llu", (unsigned long long)hc.interleaving);
    fputs("): ", stderr);
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fprintf(stderr, "\n");
    abort();
}

void harness_assert_fail(const char *file, int line, const char *what)
{
    harness_fail("UVM_ASSERT(%s) at %s:%d", what, file, line);
}

void harness_log(int error, const char *fmt, ...)
{
    va_list ap;

    __atomic_add_fetch(&hc.log_lines, 1, __ATOMIC_SEQ_CST);
    __atomic_add_fetch(&hc.error_prints, error, __ATOMIC_SEQ_CST);
    if (!hc.verbose)
        return;
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
}

int harness_scnprintf(char *buf, size_t size, const char *fmt, ...)
{
    va_list ap;
    int n;

    if (size == 0)
        return 0;
    va_start(ap, fmt);
    n = vsnprintf(buf, size, fmt, ap);
    va_end(ap);
    return n < 0 ? 0 : (n >= (int)size ? (int)size - 1 : n);
}

const char *nvstatusToString(NV_STATUS status)
{
    static __thread char buf[32];

    snprintf(buf, sizeof(buf), "NV_STATUS 0x%x", status);
    return buf;
}

// Fault injection: the fail_at-th call of a kind in `kinds` fails. A GPU failure makes the
// whole GPU side fail from then on, as a fatal UVM error does.
bool harness_fi(int kind)
{
    bool fail = false;

    harness_world_lock();
    if (hfi.gpu_fatal && kind == HARNESS_FI_GPU)
        fail = true;
    else if ((hfi.kinds & kind) && ++hfi.count == hfi.fail_at) {
        hfi.hit = kind;
        hfi.ever_hit = kind;
        hfi.gpu_fatal |= kind == HARNESS_FI_GPU;
        fail = true;
    }
    harness_world_unlock();
    return fail;
}

// ---------------------------------------------------------------------------------------------
// locks: orders must strictly increase; nothing sleeps under a spinlock. Per thread.

typedef struct { const void *lock; int order; bool write; } held_t;
static __thread held_t held[32];
static __thread int nheld;
static __thread int spin_held;

static void lock_record(const void *lock, int order, bool write, const char *what)
{
    int i;

    if (spin_held)
        harness_fail("%s taken under a spinlock", what);
    for (i = 0; i < nheld; i++) {
        if (held[i].lock == lock)
            harness_fail("%s (order %d) taken twice by one thread: deadlock", what, order);
    }
    if (nheld > 0 && held[nheld - 1].order >= order)
        harness_fail("lock order violation: %s (order %d) taken while holding order %d", what, order,
                     held[nheld - 1].order);
    held[nheld].lock = lock;
    held[nheld].order = order;
    held[nheld].write = write;
    nheld++;
}

static void lock_unrecord(const void *lock)
{
    int i;

    for (i = nheld - 1; i >= 0; i--) {
        if (held[i].lock == lock) {
            memmove(&held[i], &held[i + 1], (nheld - i - 1) * sizeof(held[0]));
            nheld--;
            return;
        }
    }
    harness_fail("unlock of a lock this thread does not hold");
}

int harness_locks_held(void)
{
    return nheld + spin_held;
}

static bool holds_order_at_least(int order)
{
    int i;

    for (i = 0; i < nheld; i++) {
        if (held[i].order >= order)
            return true;
    }
    return false;
}

static void might_sleep(const char *what)
{
    if (spin_held)
        harness_fail("%s may sleep but a spinlock is held", what);
}

void spin_lock(spinlock_t *lock)
{
    SCHED_ACQUIRE(pthread_mutex_lock, pthread_mutex_trylock, &lock->mutex, "spinlock");
    spin_held++;
}

void spin_unlock(spinlock_t *lock)
{
    spin_held--;
    pthread_mutex_unlock(&lock->mutex);
    sched_point(false);
}

void uvm_mutex_init(uvm_mutex_t *m, uvm_lock_order_t order)
{
    m->order = order;
    pthread_mutex_init(&m->mutex, NULL);
    pthread_rwlock_init(&m->rw, NULL);
}

void uvm_mutex_lock(uvm_mutex_t *m)
{
    lock_record(m, m->order, true, "mutex");
    SCHED_ACQUIRE(pthread_mutex_lock, pthread_mutex_trylock, &m->mutex, "mutex");
}

void uvm_mutex_unlock(uvm_mutex_t *m)
{
    lock_unrecord(m);
    pthread_mutex_unlock(&m->mutex);
    sched_point(false);
}

void harness_assert_locked(uvm_mutex_t *m, bool write, const char *file, int line)
{
    int i;

    for (i = 0; i < nheld; i++) {
        if (held[i].lock == m && (held[i].write || !write))
            return;
    }
    harness_fail("lock of order %d not held (%s) at %s:%d", m->order, write ? "write" : "read", file, line);
}

void uvm_va_space_down_read(uvm_va_space_t *va_space)
{
    lock_record(&va_space->lock, UVM_LOCK_ORDER_VA_SPACE, false, "va_space lock");
    SCHED_ACQUIRE(pthread_rwlock_rdlock, pthread_rwlock_tryrdlock, &va_space->lock.rw, "va_space lock");
}

void uvm_va_space_up_read(uvm_va_space_t *va_space)
{
    lock_unrecord(&va_space->lock);
    pthread_rwlock_unlock(&va_space->lock.rw);
    sched_point(true);
}

void uvm_va_space_down_write(uvm_va_space_t *va_space)
{
    lock_record(&va_space->lock, UVM_LOCK_ORDER_VA_SPACE, true, "va_space lock");
    SCHED_ACQUIRE(pthread_rwlock_wrlock, pthread_rwlock_trywrlock, &va_space->lock.rw, "va_space lock");
}

void uvm_va_space_up_write(uvm_va_space_t *va_space)
{
    lock_unrecord(&va_space->lock);
    pthread_rwlock_unlock(&va_space->lock.rw);
    sched_point(true);
}

// ---------------------------------------------------------------------------------------------
// kernel memory, with accounting

typedef struct { size_t size; NvU64 magic; } kv_header_t;
#define KV_MAGIC 0x6b766d616c6c6f63ULL

void *uvm_kvmalloc(size_t size)
{
    kv_header_t *h;

    might_sleep("uvm_kvmalloc");
    if (harness_fi(HARNESS_FI_ALLOC))
        return NULL;
    h = malloc(sizeof(*h) + size);
    if (!h)
        harness_fail("host out of memory");
    h->size = size;
    h->magic = KV_MAGIC;
    __atomic_add_fetch(&hc.kv_bytes, (long long)size, __ATOMIC_SEQ_CST);
    __atomic_add_fetch(&hc.kv_allocs, 1, __ATOMIC_SEQ_CST);
    memset(h + 1, 0xa5, size); // garbage, as kmalloc gives
    return h + 1;
}

void *uvm_kvmalloc_zero(size_t size)
{
    void *p = uvm_kvmalloc(size);

    if (p)
        memset(p, 0, size);
    return p;
}

void uvm_kvfree(void *p)
{
    kv_header_t *h;

    if (!p)
        return;
    h = (kv_header_t *)p - 1;
    if (h->magic != KV_MAGIC)
        harness_fail("uvm_kvfree of memory uvm_kvmalloc did not give");
    h->magic = 0;
    __atomic_sub_fetch(&hc.kv_bytes, (long long)h->size, __ATOMIC_SEQ_CST);
    __atomic_sub_fetch(&hc.kv_allocs, 1, __ATOMIC_SEQ_CST);
    free(h);
}

void uvm_mmgrab(struct mm_struct *mm)
{
    __atomic_add_fetch(&hc.mm_grabs, 1, __ATOMIC_SEQ_CST);
}

void uvm_mmdrop(struct mm_struct *mm)
{
    __atomic_sub_fetch(&hc.mm_grabs, 1, __ATOMIC_SEQ_CST);
}

void sort(void *base, size_t num, size_t size, int (*cmp)(const void *, const void *), void (*swap)(void *, void *, int))
{
    qsort(base, num, size, cmp);
}

// User memory: real host pointers, except those in [HARNESS_BAD_USER, +1 MiB) which fault.
static bool user_ok(const void *p, unsigned long n)
{
    uintptr_t a = (uintptr_t)p;

    if (harness_fi(HARNESS_FI_USER))
        return false;
    return !(a < 4096 || (a >= HARNESS_BAD_USER && a < HARNESS_BAD_USER + (1 << 20)));
}

unsigned long copy_from_user(void *to, const void __user *from, unsigned long n)
{
    if (harness_locks_held())
        harness_fail("copy_from_user with a lock held (a page fault could deadlock)");
    if (!user_ok(from, n))
        return n;
    memcpy(to, from, n);
    return 0;
}

unsigned long copy_to_user(void __user *to, const void *from, unsigned long n)
{
    if (harness_locks_held())
        harness_fail("copy_to_user with a lock held (a page fault could deadlock)");
    if (!user_ok(to, n))
        return n;
    memcpy(to, from, n);
    return 0;
}

// ---------------------------------------------------------------------------------------------
// idr and radix tree

void idr_init(struct idr *idr)
{
    memset(idr, 0, sizeof(*idr));
}

int idr_alloc_cyclic(struct idr *idr, void *ptr, int start, int end, int gfp)
{
    int id, i, span = end - start;

    might_sleep("idr_alloc_cyclic");
    if (harness_fi(HARNESS_FI_ALLOC))
        return -ENOMEM;
    if (hc.idr_reuse || idr->next < start || idr->next >= end)
        idr->next = start;
    for (i = 0; i < span; i++) {
        id = start + (idr->next - start + i) % span;
        if (id >= hc.idr_limit && hc.idr_limit)
            continue;
        if (id >= idr->cap) {
            int cap = id * 2 + 16;

            idr->ptrs = realloc(idr->ptrs, cap * sizeof(void *));
            memset(idr->ptrs + idr->cap, 0, (cap - idr->cap) * sizeof(void *));
            idr->cap = cap;
        }
        if (!idr->ptrs[id]) {
            idr->ptrs[id] = ptr;
            idr->next = id + 1;
            return id;
        }
    }
    return -ENOSPC;
}

void *idr_find(struct idr *idr, unsigned long id)
{
    return id < (unsigned long)idr->cap ? idr->ptrs[id] : NULL;
}

void *idr_remove(struct idr *idr, unsigned long id)
{
    void *p = idr_find(idr, id);

    if (!p)
        harness_fail("idr_remove of a free id %lu", id);
    idr->ptrs[id] = NULL;
    return p;
}

bool idr_is_empty(struct idr *idr)
{
    int i;

    for (i = 0; i < idr->cap; i++) {
        if (idr->ptrs[i])
            return false;
    }
    return true;
}

void idr_destroy(struct idr *idr)
{
    free(idr->ptrs);
    memset(idr, 0, sizeof(*idr));
}

typedef struct { unsigned long index; void *item; } radix_entry_t;
typedef struct { radix_entry_t *e; unsigned int n, cap; } radix_impl_t;

static unsigned int radix_pos(radix_impl_t *r, unsigned long index)
{
    unsigned int lo = 0, hi = r ? r->n : 0;

    while (lo < hi) {
        unsigned int mid = (lo + hi) / 2;

        if (r->e[mid].index < index)
            lo = mid + 1;
        else
            hi = mid;
    }
    return lo;
}

int radix_tree_insert(struct radix_tree_root *root, unsigned long index, void *item)
{
    radix_impl_t *r = root->impl;
    unsigned int pos;

    might_sleep("radix_tree_insert");
    if (harness_fi(HARNESS_FI_ALLOC))
        return -ENOMEM;
    if (!r)
        r = root->impl = calloc(1, sizeof(*r));
    pos = radix_pos(r, index);
    if (pos < r->n && r->e[pos].index == index)
        return -EEXIST;
    if (r->n == r->cap) {
        r->cap = r->cap * 2 + 16;
        r->e = realloc(r->e, r->cap * sizeof(*r->e));
    }
    memmove(&r->e[pos + 1], &r->e[pos], (r->n - pos) * sizeof(*r->e));
    r->e[pos].index = index;
    r->e[pos].item = item;
    r->n++;
    return 0;
}

void *radix_tree_lookup(struct radix_tree_root *root, unsigned long index)
{
    radix_impl_t *r = root->impl;
    unsigned int pos = radix_pos(r, index);

    return r && pos < r->n && r->e[pos].index == index ? r->e[pos].item : NULL;
}

void *radix_tree_delete(struct radix_tree_root *root, unsigned long index)
{
    radix_impl_t *r = root->impl;
    unsigned int pos = radix_pos(r, index);
    void *item;

    if (!r || pos >= r->n || r->e[pos].index != index)
        return NULL;
    item = r->e[pos].item;
    memmove(&r->e[pos], &r->e[pos + 1], (r->n - pos - 1) * sizeof(*r->e));
    r->n--;
    if (r->n == 0) {
        free(r->e);
        free(r);
        root->impl = NULL;
    }
    return item;
}

unsigned int radix_tree_gang_lookup(struct radix_tree_root *root, void **results, unsigned long first, unsigned int max_items)
{
    radix_impl_t *r = root->impl;
    unsigned int pos = radix_pos(r, first), n = 0;

    while (r && pos < r->n && n < max_items)
        results[n++] = r->e[pos++].item;
    return n;
}

// ---------------------------------------------------------------------------------------------
// video memory (PMM)

harness_chunk_t *harness_chunk_at(harness_gpu_t *hg, NvU64 address)
{
    NvU64 i = (address - HARNESS_VIDMEM_BASE) / UVM_CHUNK_SIZE_MAX;

    if (address < HARNESS_VIDMEM_BASE || i >= HARNESS_CHUNKS)
        return NULL;
    return &hg->chunks[i];
}

static harness_gpu_t *gpu_of(uvm_gpu_t *gpu)
{
    return container_of(gpu, harness_gpu_t, gpu);
}

NV_STATUS uvm_pmm_gpu_alloc_kernel(uvm_pmm_gpu_t *pmm, size_t n, NvU64 size, uvm_pmm_alloc_flags_t flags,
                                   uvm_gpu_chunk_t **chunks, uvm_tracker_t *out_tracker)
{
    harness_gpu_t *hg = gpu_of(pmm->gpu);
    harness_chunk_t *c = NULL;
    int i, s;

    might_sleep("uvm_pmm_gpu_alloc_kernel");
    if (n != 1 || size != UVM_CHUNK_SIZE_MAX || out_tracker)
        harness_fail("PMM asked for %zu x 0x%llx", n, (unsigned long long)size);
    // Evicting may take VA block locks: nothing at or after VA_BLOCK may be held.
    if ((flags & UVM_PMM_ALLOC_FLAGS_EVICT) && holds_order_at_least(UVM_LOCK_ORDER_VA_BLOCK))
        harness_fail("PMM eviction with a lock at or after VA_BLOCK held");
    if (harness_fi(HARNESS_FI_ALLOC))
        return NV_ERR_NO_MEMORY;
    harness_world_lock();
    // Last freed first: a stale PTE to a chunk is most likely to meet its next owner.
    for (i = hg->nfree - 1; i >= 0 && !c; i--) {
        c = &hg->chunks[hg->free_list[i]];
        memmove(&hg->free_list[i], &hg->free_list[i + 1], (hg->nfree - i - 1) * sizeof(int));
        hg->nfree--;
    }
    if (!c) {
        if (hg->used_chunks >= hg->capacity) {
            harness_world_unlock();
            return NV_ERR_NO_MEMORY;
        }
        c = &hg->chunks[hg->used_chunks++];
        c->chunk.address = HARNESS_VIDMEM_BASE + (NvU64)(c - hg->chunks) * UVM_CHUNK_SIZE_MAX;
        c->chunk.id = (int)(c - hg->chunks);
        for (s = 0; s < 32; s++)
            c->tags[s] = HARNESS_FOREIGN;
    }
    c->live = true;
    switch (hc.pmm_zero_mode) {
        case HARNESS_ZERO_NEVER: c->chunk.is_zero = false; break;
        case HARNESS_ZERO_ALWAYS: c->chunk.is_zero = true; break;
        default: c->chunk.is_zero = harness_rand() % 2; break;
    }
    // What PMM says is zero is zero; anything else holds another tenant's data.
    for (s = 0; s < 32; s++)
        c->tags[s] = c->chunk.is_zero ? 0 : HARNESS_FOREIGN;
    hg->live_chunks++;
    hc.pmm_allocs++;
    *chunks = &c->chunk;
    harness_world_unlock();
    return NV_OK;
}

void uvm_pmm_gpu_free(uvm_pmm_gpu_t *pmm, uvm_gpu_chunk_t *chunk, uvm_tracker_t *tracker)
{
    harness_gpu_t *hg = gpu_of(pmm->gpu);
    harness_chunk_t *c = harness_chunk_at(hg, chunk->address);

    harness_world_lock();
    if (!c || !c->live)
        harness_fail("PMM free of a chunk that is not allocated");
    if (tracker)
        harness_fail("KVC frees chunks with work pending");
    harness_check_chunk_unreferenced(hg, chunk->address);
    c->live = false;
    hg->free_list[hg->nfree++] = chunk->id;
    hg->live_chunks--;
    hc.pmm_frees++;
    harness_world_unlock();
}

uvm_gpu_address_t uvm_gpu_address_copy(uvm_gpu_t *gpu, uvm_gpu_phys_address_t phys)
{
    uvm_gpu_address_t a = { phys.address, false, phys.aperture };

    return a;
}

bool uvm_gpu_can_address(uvm_gpu_t *gpu, NvU64 addr, NvU64 size)
{
    return addr + size <= (1ULL << 49);
}

// ---------------------------------------------------------------------------------------------
// pushes and trackers

static harness_push_t *all_pushes;

static void push_op(uvm_push_t *push, harness_op_t op, NvU32 bytes)
{
    harness_push_t *p = push->impl;

    harness_world_lock();
    if (!p || p->ended)
        harness_fail("operation on a push that is not open");
    if (p->nops == p->cap) {
        p->cap = p->cap * 2 + 16;
        p->ops = realloc(p->ops, p->cap * sizeof(*p->ops));
    }
    p->ops[p->nops++] = op;
    p->bytes += bytes;
    if (p->bytes > UVM_MAX_PUSH_SIZE)
        harness_fail("push overflow: %u bytes of methods", p->bytes);
    harness_world_unlock();
}

NV_STATUS harness_push_begin(void *manager, uvm_tracker_t *tracker, uvm_push_t *push)
{
    harness_push_t *p;
    NvU32 i;

    if (!manager)
        harness_fail("push on a GPU without a channel manager");
    lock_record(push, UVM_LOCK_ORDER_PUSH, true, "push");
    if (harness_fi(HARNESS_FI_GPU)) {
        lock_unrecord(push);
        return NV_ERR_RC_ERROR;
    }
    harness_world_lock();
    p = calloc(1, sizeof(*p));
    p->id = (NvU32)__atomic_add_fetch(&hc.pushes, 1, __ATOMIC_SEQ_CST);
    p->bytes = 64; // begin methods, semaphore release at the end
    for (i = 0; tracker && i < tracker->count; i++)
        p->deps[p->ndeps++] = tracker->pushes[i];
    p->next_all = all_pushes;
    all_pushes = p;
    memset(push, 0, sizeof(*push));
    push->impl = p;
    push->gpu = ((harness_gpu_t *)manager)->self;
    sched_queued = true;
    harness_world_unlock();
    return NV_OK;
}

void uvm_push_set_flag(uvm_push_t *push, uvm_push_flag_t flag)
{
    push->flags |= flag;
}

bool uvm_push_has_space(uvm_push_t *push, NvU32 free_space)
{
    return push->impl->bytes + free_space <= UVM_MAX_PUSH_SIZE;
}

void uvm_push_end(uvm_push_t *push)
{
    if (push->impl->ended)
        harness_fail("push ended twice");
    push->impl->ended = true;
    lock_unrecord(push);
}

static void push_run(harness_push_t *p)
{
    NvU32 i;

    harness_world_lock();
    if (p->done) {
        harness_world_unlock();
        return;
    }
    if (!p->ended)
        harness_fail("waiting for a push that was never ended");
    for (i = 0; i < p->ndeps; i++)
        push_run(p->deps[i]);
    for (i = 0; i < p->nops; i++)
        harness_gpu_execute(&p->ops[i]);
    p->done = true;
    harness_world_unlock();
}

NV_STATUS uvm_push_end_and_wait(uvm_push_t *push)
{
    uvm_push_end(push);
    __atomic_add_fetch(&hc.waits, 1, __ATOMIC_SEQ_CST);
    might_sleep("push wait");
    push_run(push->impl);
    sched_queued = false;
    return harness_fi(HARNESS_FI_GPU) ? NV_ERR_RC_ERROR : NV_OK;
}

void uvm_tracker_init(uvm_tracker_t *t)
{
    t->count = 0;
}

static void tracker_add(uvm_tracker_t *t, harness_push_t *p)
{
    NvU32 i;

    for (i = 0; i < t->count; i++) {
        if (t->pushes[i] == p)
            return;
    }
    if (t->count == ARRAY_SIZE(t->pushes)) {
        // A real tracker keeps one entry per channel; here the oldest entry is completed.
        push_run(t->pushes[0]);
        memmove(&t->pushes[0], &t->pushes[1], (t->count - 1) * sizeof(t->pushes[0]));
        t->count--;
    }
    t->pushes[t->count++] = p;
}

NV_STATUS uvm_tracker_add_push_safe(uvm_tracker_t *tracker, uvm_push_t *push)
{
    if (harness_fi(HARNESS_FI_ALLOC)) {
        __atomic_add_fetch(&hc.waits, 1, __ATOMIC_SEQ_CST);
        push_run(push->impl); // the documented fallback: it waits for the push itself
        return NV_ERR_NO_MEMORY;
    }
    tracker_add(tracker, push->impl);
    return NV_OK;
}

NV_STATUS uvm_tracker_add_tracker_safe(uvm_tracker_t *dst, uvm_tracker_t *src)
{
    NvU32 i;

    if (harness_fi(HARNESS_FI_ALLOC))
        return NV_ERR_NO_MEMORY;
    for (i = 0; i < src->count; i++)
        tracker_add(dst, src->pushes[i]);
    return NV_OK;
}

void uvm_tracker_overwrite_with_push(uvm_tracker_t *tracker, uvm_push_t *push)
{
    tracker->count = 0;
    tracker_add(tracker, push->impl);
}

NV_STATUS uvm_tracker_wait_deinit(uvm_tracker_t *tracker)
{
    NvU32 i;
    bool pending = false;

    might_sleep("tracker wait");
    harness_world_lock();
    for (i = 0; i < tracker->count; i++)
        pending |= !tracker->pushes[i]->done;
    for (i = 0; i < tracker->count; i++)
        push_run(tracker->pushes[i]);
    tracker->count = 0;
    if (pending)
        hc.waits++;
    sched_queued = false;
    harness_world_unlock();
    return harness_fi(HARNESS_FI_GPU) ? NV_ERR_RC_ERROR : NV_OK;
}

// Every push was waited for: the synchronous contract of every KVC ioctl.
void harness_check_no_pending_work(void)
{
    harness_push_t *p;

    for (p = all_pushes; p; p = p->next_all) {
        if (!p->ended)
            harness_fail("push %u left open", p->id);
        if (!p->done)
            harness_fail("push %u (%u ops) was never waited for", p->id, p->nops);
    }
}

void harness_free_pushes(void)
{
    harness_push_t *p, *next;

    for (p = all_pushes; p; p = next) {
        next = p->next_all;
        if (!p->done)
            harness_fail("push %u freed while pending", p->id);
        free(p->ops);
        free(p);
    }
    all_pushes = NULL;
}

// CE memset of video memory (the only CE operation the KVC files use).
static void ce_memset_8(uvm_push_t *push, uvm_gpu_address_t dst, NvU64 value, size_t size)
{
    harness_op_t op = { HARNESS_OP_MEMSET, gpu_of(push->gpu), dst.address, size, value, 0 };

    push_op(push, op, 64);
    push->flags = 0;
}

uvm_ce_hal_t harness_ce_hal = { ce_memset_8 };

// ---------------------------------------------------------------------------------------------
// page tables

static harness_table_t *table_of(uvm_gpu_phys_address_t pa, NvU32 *index)
{
    harness_table_t *t;

    if (pa.aperture != UVM_APERTURE_SYS || (pa.address & ~((1ULL << 48) - 1)) != HARNESS_TABLE_BASE)
        harness_fail("PTE address 0x%llx is not a page table entry", (unsigned long long)pa.address);
    t = harness_table_by_id((NvU64)((pa.address >> 8) & 0xffffffffffULL));
    *index = (NvU32)((pa.address & 0xff) / 8);
    if (!t)
        harness_fail("PTE address 0x%llx in a freed page table", (unsigned long long)pa.address);
    return t;
}

uvm_gpu_phys_address_t uvm_page_table_range_entry_address(uvm_page_tree_t *tree, uvm_page_table_range_t *range,
                                                          size_t entry_index)
{
    if (entry_index >= range->entry_count)
        harness_fail("entry %zu of a %u-entry range", entry_index, range->entry_count);
    return uvm_gpu_phys_address(UVM_APERTURE_SYS,
                                HARNESS_TABLE_BASE | ((NvU64)range->table->id << 8) | ((range->start_index + entry_index) * 8));
}

NV_STATUS uvm_page_tree_get_ptes_async(uvm_page_tree_t *tree, NvU64 page_size, NvU64 start, NvU64 size,
                                       uvm_pmm_alloc_flags_t pmm_flags, uvm_page_table_range_t *range)
{
    harness_table_t *t;
    uvm_push_t push;
    harness_op_t op = { HARNESS_OP_TABLE_INIT };

    might_sleep("get_ptes");
    if (page_size != UVM_PAGE_SIZE_64K || size != UVM_PAGE_SIZE_2M || !IS_ALIGNED(start, UVM_PAGE_SIZE_2M))
        harness_fail("get_ptes(0x%llx, 0x%llx, 0x%llx): KVC asks for whole 2 MiB tables of 64K PTEs",
                     (unsigned long long)page_size, (unsigned long long)start, (unsigned long long)size);
    if (harness_table_find(tree, start))
        harness_fail("get_ptes over a window that already has KVC PTEs (0x%llx)", (unsigned long long)start);
    if ((pmm_flags & UVM_PMM_ALLOC_FLAGS_EVICT) && holds_order_at_least(UVM_LOCK_ORDER_VA_BLOCK))
        harness_fail("page table allocation with eviction under a lock at or after VA_BLOCK");
    if (harness_fi(HARNESS_FI_ALLOC))
        return NV_ERR_NO_MEMORY;

    uvm_mutex_lock(&tree->lock);
    harness_world_lock();
    t = harness_table_new(tree, start);
    harness_world_unlock();
    // The initialisation is a push of the tree's own, tracked in tree->tracker.
    if (harness_push_begin(tree->gpu->channel_manager, NULL, &push) != NV_OK) {
        harness_world_lock();
        harness_table_free(t);
        harness_world_unlock();
        uvm_mutex_unlock(&tree->lock);
        return NV_ERR_RC_ERROR;
    }
    op.table = t;
    push_op(&push, op, 64);
    uvm_push_end(&push);
    tracker_add(&tree->tracker, push.impl);
    uvm_mutex_unlock(&tree->lock);

    range->table = t;
    range->start_index = 0;
    range->entry_count = 32;
    range->page_size = page_size;
    __atomic_add_fetch(&hc.tables_got, 1, __ATOMIC_SEQ_CST);
    return NV_OK;
}

void uvm_page_tree_put_ptes_async(uvm_page_tree_t *tree, uvm_page_table_range_t *range)
{
    harness_table_t *t = range->table;
    NvU32 i;

    harness_world_lock();
    // Stock put_ptes acquires the tree's tracker: a table initialisation still pending runs
    // before the PDE clear and the free.
    for (i = 0; i < tree->tracker.count; i++)
        push_run(tree->tracker.pushes[i]);
    // The caller wrote empty PTEs first (uvm_mmu.h), unless a GPU error stopped it.
    for (i = 0; i < 32 && !hfi.gpu_fatal; i++) {
        if (t->entries[i] != 0)
            harness_fail("put_ptes of a table with a valid PTE at 0x%llx", (unsigned long long)(t->start + i * UVM_PAGE_SIZE_64K));
    }
    harness_world_unlock();
    uvm_mutex_lock(&tree->lock);
    harness_world_lock();
    // Stock put_ptes clears the PDE and invalidates every TLB entry of the tree.
    harness_tlb_drop(gpu_of(tree->gpu), 0, ~0ULL);
    harness_table_free(t);
    harness_world_unlock();
    uvm_mutex_unlock(&tree->lock);
    __atomic_add_fetch(&hc.tables_put, 1, __ATOMIC_SEQ_CST);
    memset(range, 0, sizeof(*range));
}

NV_STATUS uvm_page_tree_wait(uvm_page_tree_t *tree)
{
    uvm_mutex_lock(&tree->lock);
    (void)uvm_tracker_wait_deinit(&tree->tracker);
    uvm_mutex_unlock(&tree->lock);
    return hfi.gpu_fatal ? NV_ERR_RC_ERROR : NV_OK;
}

void uvm_pte_batch_begin(uvm_push_t *push, uvm_pte_batch_t *batch)
{
    memset(batch, 0, sizeof(*batch));
    batch->push = push;
    batch->open = true;
}

void uvm_pte_batch_write_pte(uvm_pte_batch_t *batch, uvm_gpu_phys_address_t pte, NvU64 pte_bits, NvU32 entry_size)
{
    harness_op_t op = { HARNESS_OP_PTE_WRITE };
    NvU32 index;
    // Consecutive entries share one inline copy; anything else starts a new one.
    NvU32 bytes = pte.address == batch->last_pte + 8 ? 8 : 80;

    harness_world_lock();
    op.table = table_of(pte, &index);
    harness_world_unlock();
    // The GPU whose memory the PTE points at: the table's own (KVC maps no peer memory).
    op.gpu = gpu_of(op.table->tree->gpu);
    op.a = index;
    op.c = pte_bits;
    push_op(batch->push, op, bytes);
    batch->last_pte = pte.address;
    __atomic_add_fetch(&hc.pte_writes, 1, __ATOMIC_SEQ_CST);
}

void uvm_pte_batch_clear_ptes(uvm_pte_batch_t *batch, uvm_gpu_phys_address_t first_pte, NvU64 empty_pte_bits,
                              NvU32 entry_size, NvU32 entry_count)
{
    harness_op_t op = { HARNESS_OP_PTE_CLEAR };
    NvU32 index;

    harness_world_lock();
    op.table = table_of(first_pte, &index);
    harness_world_unlock();
    if (index + entry_count > 32)
        harness_fail("PTE clear past the end of a table");
    op.a = index;
    op.b = entry_count;
    op.c = empty_pte_bits;
    push_op(batch->push, op, 64);
    batch->last_pte = 0;
    __atomic_add_fetch(&hc.pte_clears, entry_count, __ATOMIC_SEQ_CST);
}

void uvm_pte_batch_end(uvm_pte_batch_t *batch)
{
    harness_op_t op = { HARNESS_OP_MEMBAR };

    push_op(batch->push, op, 16);
    batch->open = false;
}

void uvm_tlb_batch_single_invalidate(uvm_page_tree_t *tree, uvm_push_t *push, NvU64 start, NvU64 size,
                                     NvU64 page_sizes, uvm_membar_t tlb_membar)
{
    harness_op_t op = { HARNESS_OP_TLB_INVALIDATE, gpu_of(tree->gpu), start, size, tlb_membar };

    push_op(push, op, 48);
    __atomic_add_fetch(&hc.invalidates, 1, __ATOMIC_SEQ_CST);
}

// ---------------------------------------------------------------------------------------------
// va_space, GPUs and ranges

uvm_va_space_t *uvm_va_space_get(struct file *filp)
{
    return ((harness_file_t *)filp)->va_space;
}

uvm_fd_type_t uvm_fd_type(struct file *filp, void **ptr)
{
    harness_file_t *f = (harness_file_t *)filp;

    *ptr = f->va_space;
    return f->type;
}

bool uvm_va_space_mm_enabled(uvm_va_space_t *va_space)
{
    return va_space->mm_enabled;
}

struct mm_struct *uvm_va_space_mm_or_current_retain_lock(uvm_va_space_t *va_space)
{
    lock_record(&va_space->va_space_mm, 5, false, "mmap_lock");
    return current->mm;
}

void uvm_va_space_mm_or_current_release_unlock(uvm_va_space_t *va_space, struct mm_struct *mm)
{
    lock_unrecord(&va_space->va_space_mm);
}

uvm_gpu_t *uvm_va_space_get_gpu_by_uuid(uvm_va_space_t *va_space, const NvProcessorUuid *uuid)
{
    size_t i;

    harness_assert_locked(&va_space->lock, false, __FILE__, __LINE__);
    for (i = 0; i < UVM_ID_MAX_GPUS; i++) {
        if (va_space->gpus[i] && !memcmp(va_space->gpus[i]->uuid.uuid, uuid->uuid, 16))
            return va_space->gpus[i];
    }
    return NULL;
}

uvm_gpu_t *uvm_va_space_get_gpu_by_uuid_with_gpu_va_space(uvm_va_space_t *va_space, const NvProcessorUuid *uuid)
{
    uvm_gpu_t *gpu = uvm_va_space_get_gpu_by_uuid(va_space, uuid);

    return gpu && uvm_gpu_va_space_get(va_space, gpu) ? gpu : NULL;
}

uvm_gpu_va_space_t *uvm_gpu_va_space_get(uvm_va_space_t *va_space, uvm_gpu_t *gpu)
{
    return va_space->gpu_va_spaces[uvm_id_gpu_index(gpu->id)];
}

bool uvm_api_range_invalid_64k(NvU64 base, NvU64 length)
{
    return !IS_ALIGNED(base, UVM_PAGE_SIZE_64K) || !IS_ALIGNED(length, UVM_PAGE_SIZE_64K) || base == 0 ||
           length == 0 || base + length < base;
}

uvm_kvc_ext_range_t *uvm_kvc_ext_range_find(uvm_va_space_t *va_space, NvU64 addr)
{
    size_t i;

    harness_assert_locked(&va_space->lock, false, __FILE__, __LINE__);
    for (i = 0; i < ARRAY_SIZE(va_space->ranges); i++) {
        harness_ext_range_t *r = va_space->ranges[i];

        if (r && r->node.start <= addr && addr <= r->node.end)
            return r;
    }
    return NULL;
}

NV_STATUS uvm_kvc_ext_range_create(uvm_va_space_t *va_space, struct mm_struct *mm, NvU64 start, NvU64 length,
                                   uvm_kvc_ext_range_t **out)
{
    harness_ext_range_t *r;
    size_t i, slot = ARRAY_SIZE(va_space->ranges);

    harness_assert_locked(&va_space->lock, true, __FILE__, __LINE__);
    for (i = 0; i < ARRAY_SIZE(va_space->ranges); i++) {
        r = va_space->ranges[i];
        if (!r) {
            slot = min(slot, i);
            continue;
        }
        if (r->node.start < start + length && start <= r->node.end)
            return NV_ERR_UVM_ADDRESS_IN_USE;
    }
    if (slot == ARRAY_SIZE(va_space->ranges) || harness_fi(HARNESS_FI_ALLOC))
        return NV_ERR_NO_MEMORY;
    r = calloc(1, sizeof(*r));
    r->node.start = start;
    r->node.end = start + length - 1;
    r->va_space = va_space;
    va_space->ranges[slot] = r;
    *out = r;
    return NV_OK;
}

// A chunk may go back to PMM only when nothing can reach it: no valid PTE, no TLB entry, no
// memset or PTE write still queued. Queued operations are those of every GPU (the harness's
// threads use one each): only those for hg's memory count, since every GPU's video memory spans
// the same addresses; another GPU's PTE write to "this" address is to its own chunk.
void harness_check_chunk_unreferenced(harness_gpu_t *hg, NvU64 address)
{
    harness_chunk_t *c = harness_chunk_at(hg, address);
    harness_push_t *p;
    NvU32 i;
    int s;

    for (s = 0; s < 32; s++) {
        if (c->ptes[s])
            harness_fail("chunk 0x%llx freed with %d valid PTEs to its slot %d", (unsigned long long)address, c->ptes[s], s);
        if (c->tlb[s])
            harness_fail("chunk 0x%llx freed with a TLB entry to its slot %d", (unsigned long long)address, s);
    }
    for (p = all_pushes; p; p = p->next_all) {
        for (i = 0; i < p->nops && !p->done; i++) {
            harness_op_t *op = &p->ops[i];
            NvU64 target = op->kind == HARNESS_OP_MEMSET ? op->a :
                           op->kind == HARNESS_OP_PTE_WRITE && (op->c & HARNESS_PTE_VALID) ? (op->c & ~0xffffULL) : 0;

            if (op->gpu == hg && target >= address && target < address + UVM_CHUNK_SIZE_MAX)
                harness_fail("chunk 0x%llx of %s freed with push %u still to write it", (unsigned long long)address, hg->gpu.name, p->id);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// module parameters, randomness

static struct { const char *name; void *addr; size_t size; } params[16];
static int nparams;

void harness_param_register(const char *name, void *addr, size_t size)
{
    params[nparams].name = name;
    params[nparams].addr = addr;
    params[nparams].size = size;
    nparams++;
}

void harness_param_set(const char *name, unsigned int value)
{
    int i;

    for (i = 0; i < nparams; i++) {
        if (!strcmp(params[i].name, name)) {
            if (params[i].size == sizeof(bool))
                *(bool *)params[i].addr = value != 0;
            else
                *(unsigned int *)params[i].addr = value;
            return;
        }
    }
    harness_fail("no module parameter %s", name);
}

void get_random_bytes(void *buf, int nbytes)
{
    NvU64 r = harness_rand();

    memcpy(buf, &r, min((size_t)nbytes, sizeof(r)));
}

// Completed entries leave a tracker (as uvm_tracker_remove_completed() does).
void harness_tracker_prune(uvm_tracker_t *t)
{
    NvU32 i, n = 0;

    for (i = 0; i < t->count; i++) {
        if (!t->pushes[i]->done)
            t->pushes[n++] = t->pushes[i];
    }
    t->count = n;
}

/*
 * uvm_kvc_test.c: kernel self-test for the KVC ioctls (UVM_KVC_TEST_SANITY), reachable only when
 * nvidia-uvm is loaded with uvm_enable_builtin_tests=1 (routed through uvm_test_ioctl()).
 *
 * Needs a GPU registered with a GPU VA space on the calling fd, and an unused PROT_NONE region
 * [base, base + length) (>= 2 MiB, 64K aligned), which it turns into a KVC range and leaves in
 * place: the caller frees it with UVM_FREE. Checks: handle table (alloc/free round trips, a stale
 * handle refused after its slot was reused with the same id and a new generation, duplicates
 * and bad inputs refused with nothing changed), 128K/256K slot alignment, pool accounting back
 * to zero, fresh roots zeroed even when PMM would call them zero (forced), recycled pages read
 * back through CE (old data without FLAGS_ZERO, zeros with it, over several zeroing pushes), the
 * PTEs themselves read back through CE after map, replace and unmap, mapping references (map,
 * FREE while mapped, partial unmap, replace on remap) and that all memory returns to PMM.
 *
 * The GPU is retained for the whole test and looked up again under each va_space lock section
 * that allocates on it: another thread of the caller may unregister it in between, and then the
 * test fails with NV_ERR_INVALID_DEVICE instead of allocating on a GPU the va_space lost.
 */

#include "uvm_kvc_internal.h"
#include "uvm_test.h"
#include "uvm_api.h"
#include "uvm_gpu.h"
#include "uvm_hal.h"
#include "uvm_kvmalloc.h"
#include "uvm_mem.h"
#include "uvm_push.h"

#define KVC_TEST_PAGES 40
#define KVC_TEST_ZERO_PAGES 200 /* recycled with FLAGS_ZERO: more than three zeroing pushes */
#define KVC_TEST_MAX_ITERATIONS 1000
#define KVC_TEST_SLOTS_PER_ROOT (UVM_CHUNK_SIZE_MAX / UVM_PAGE_SIZE_64K)
#define KVC_TEST_PATTERN 0xa5a5a5a5a5a5a5a5ULL

// va_space lock held: the KVC state, if `gpu` is still the one registered (with a GPU VA space)
// under `uuid`; NULL and *status set otherwise.
static uvm_kvc_va_space_t *kvc_test_state(uvm_va_space_t *va_space, const NvProcessorUuid *uuid, uvm_gpu_t *gpu,
                                          NV_STATUS *status)
{
    if (uvm_va_space_get_gpu_by_uuid_with_gpu_va_space(va_space, uuid) != gpu) {
        *status = NV_ERR_INVALID_DEVICE;
        return NULL;
    }
    return uvm_kvc_get(va_space, true, status);
}

static NV_STATUS kvc_test_table(uvm_va_space_t *va_space, uvm_gpu_t *gpu, const NvProcessorUuid *uuid)
{
    NvU64 *handles = uvm_kvmalloc_zero(KVC_TEST_PAGES * sizeof(*handles));
    NvU64 keep, stale, again[2], phys, size, refs;
    UVM_KVC_SCATTER_ENTRY entry;
    uvm_kvc_va_space_t *kvc;
    NV_STATUS status = NV_OK;
    NvU64 i;

    if (!handles)
        return NV_ERR_NO_MEMORY;

    uvm_va_space_down_read(va_space);
    kvc = kvc_test_state(va_space, uuid, gpu, &status);
    if (!kvc)
        goto out;
    TEST_CHECK_GOTO(uvm_kvc_bytes_held(kvc, gpu) == 0, out);

    // 40 x 64K needs two roots; all of it goes back on free.
    TEST_NV_CHECK_GOTO(uvm_kvc_alloc_pages(kvc, gpu, UVM_KVC_PAGE_SIZE_64K, 0, KVC_TEST_PAGES, handles), out);
    TEST_CHECK_GOTO(uvm_kvc_bytes_held(kvc, gpu) == 2 * UVM_CHUNK_SIZE_MAX, out);
    for (i = 0; i < KVC_TEST_PAGES; i++) {
        TEST_NV_CHECK_GOTO(uvm_kvc_handle_info(kvc, handles[i], &phys, &size, &refs), out);
        TEST_CHECK_GOTO(size == UVM_PAGE_SIZE_64K && refs == 0 && IS_ALIGNED(phys, UVM_PAGE_SIZE_64K), out);
    }

    // Duplicates: refused, nothing freed.
    again[0] = handles[0];
    again[1] = handles[0];
    TEST_CHECK_GOTO(uvm_kvc_free_pages(kvc, 0, 2, again) == NV_ERR_INVALID_ARGUMENT, out);
    TEST_NV_CHECK_GOTO(uvm_kvc_handle_info(kvc, handles[0], &phys, &size, &refs), out);

    // Unknown handle in a batch: refused, nothing freed.
    again[0] = handles[1];
    again[1] = 0x1234ULL << 32 | 0x7fffffff;
    TEST_CHECK_GOTO(uvm_kvc_free_pages(kvc, 0, 2, again) == NV_ERR_INVALID_OBJECT_HANDLE, out);
    TEST_NV_CHECK_GOTO(uvm_kvc_handle_info(kvc, handles[1], &phys, &size, &refs), out);

    // A slot freed and allocated again (its root kept by handles[0]) has the same id and a new
    // generation: the old handle is refused by FREE, lookups and MAP.
    keep = handles[0];
    stale = handles[1];
    TEST_NV_CHECK_GOTO(uvm_kvc_free_pages(kvc, 0, KVC_TEST_PAGES - 1, &handles[1]), out);
    TEST_NV_CHECK_GOTO(uvm_kvc_alloc_pages(kvc, gpu, UVM_KVC_PAGE_SIZE_64K, 0, 1, &again[0]), out);
    TEST_CHECK_GOTO((NvU32)again[0] == (NvU32)stale, out);
    TEST_CHECK_GOTO(again[0] != stale, out);
    TEST_CHECK_GOTO(uvm_kvc_handle_info(kvc, stale, &phys, &size, &refs) == NV_ERR_INVALID_OBJECT_HANDLE, out);
    again[1] = stale;
    TEST_CHECK_GOTO(uvm_kvc_free_pages(kvc, 0, 1, &again[1]) == NV_ERR_INVALID_OBJECT_HANDLE, out);
    uvm_va_space_up_read(va_space);
    entry.va = 0;
    entry.handle = stale;
    status = uvm_kvc_map(va_space, uuid, 0, &entry, 1, 0);
    uvm_va_space_down_read(va_space);
    TEST_CHECK_GOTO(status == NV_ERR_INVALID_OBJECT_HANDLE, out);
    status = NV_OK;
    again[1] = keep;
    TEST_NV_CHECK_GOTO(uvm_kvc_free_pages(kvc, 0, 2, again), out);
    TEST_CHECK_GOTO(uvm_kvc_bytes_held(kvc, gpu) == 0, out);

    // 128K and 256K pages are naturally aligned runs of slots.
    TEST_NV_CHECK_GOTO(uvm_kvc_alloc_pages(kvc, gpu, UVM_KVC_PAGE_SIZE_256K, UVM_KVC_ALLOC_FLAGS_ZERO, 1, &again[1]), out);
    TEST_NV_CHECK_GOTO(uvm_kvc_handle_info(kvc, again[1], &phys, &size, &refs), out);
    TEST_CHECK_GOTO(size == UVM_KVC_PAGE_SIZE_256K && IS_ALIGNED(phys, UVM_KVC_PAGE_SIZE_256K), out);
    TEST_NV_CHECK_GOTO(uvm_kvc_free_pages(kvc, 0, 1, &again[1]), out);
    TEST_CHECK_GOTO(uvm_kvc_bytes_held(kvc, gpu) == 0, out);

out:
    uvm_va_space_up_read(va_space);
    uvm_kvfree(handles);
    return status;
}

// CE-copies `size` bytes at physical `addr` (vidmem or sysmem) into the sysmem buffer `buf`.
static NV_STATUS kvc_test_read(uvm_gpu_t *gpu, uvm_gpu_phys_address_t addr, NvU64 size, uvm_mem_t *buf)
{
    uvm_push_t push;

    TEST_NV_CHECK_RET(uvm_push_begin(gpu->channel_manager, UVM_CHANNEL_TYPE_GPU_INTERNAL, &push, "KVC test read"));
    gpu->parent->ce_hal->memcopy(&push, uvm_mem_gpu_address_virtual_kernel(buf, gpu), uvm_gpu_address_copy(gpu, addr), size);
    return uvm_push_end_and_wait(&push);
}

// va_space lock held, no KVC lock: CE-fill every 64K page of `handles` with `value`, waited on.
// The addresses are looked up (under the KVC lock) before the push begins: no push is ever open
// while the KVC lock is taken.
static NV_STATUS kvc_test_fill(uvm_kvc_va_space_t *kvc, uvm_gpu_t *gpu, const NvU64 *handles, NvU64 n, NvU64 value)
{
    NvU64 *phys = uvm_kvmalloc(n * sizeof(*phys));
    NvU64 i, size, refs;
    uvm_push_t push;
    NV_STATUS status = NV_OK;

    if (!phys)
        return NV_ERR_NO_MEMORY;
    for (i = 0; i < n && status == NV_OK; i++) {
        status = uvm_kvc_handle_info(kvc, handles[i], &phys[i], &size, &refs);
        if (status == NV_OK && size != UVM_PAGE_SIZE_64K)
            status = NV_ERR_INVALID_STATE;
    }

    // At most KVC_TEST_ZERO_PAGES memsets: well inside one push.
    if (status == NV_OK)
        status = uvm_push_begin(gpu->channel_manager, UVM_CHANNEL_TYPE_GPU_INTERNAL, &push, "KVC test fill");
    if (status == NV_OK) {
        for (i = 0; i < n; i++) {
            uvm_push_set_flag(&push, UVM_PUSH_FLAG_CE_NEXT_PIPELINED);
            uvm_push_set_flag(&push, UVM_PUSH_FLAG_NEXT_MEMBAR_NONE);
            gpu->parent->ce_hal->memset_8(&push,
                                          uvm_gpu_address_copy(gpu, uvm_gpu_phys_address(UVM_APERTURE_VID, phys[i])),
                                          value,
                                          UVM_PAGE_SIZE_64K);
        }
        status = uvm_push_end_and_wait(&push);
    }
    uvm_kvfree(phys);
    return status;
}

// va_space lock held, no KVC lock: does every 64K page of `handles` read back as `value`?
static NV_STATUS kvc_test_expect(uvm_kvc_va_space_t *kvc,
                                 uvm_gpu_t *gpu,
                                 const NvU64 *handles,
                                 NvU64 n,
                                 NvU64 value,
                                 uvm_mem_t *buf)
{
    const NvU64 *cpu = uvm_mem_get_cpu_addr_kernel(buf);
    NvU64 i, j, phys, size, refs;

    for (i = 0; i < n; i++) {
        TEST_NV_CHECK_RET(uvm_kvc_handle_info(kvc, handles[i], &phys, &size, &refs));
        TEST_CHECK_RET(size == UVM_PAGE_SIZE_64K);
        TEST_NV_CHECK_RET(kvc_test_read(gpu, uvm_gpu_phys_address(UVM_APERTURE_VID, phys), size, buf));
        for (j = 0; j < size / sizeof(*cpu); j++) {
            if (cpu[j] != value) {
                UVM_TEST_PRINT("KVC page %llu of %llu: word %llu is 0x%llx, expected 0x%llx\n", i, n, j, cpu[j], value);
                return NV_ERR_INVALID_STATE;
            }
        }
    }
    return NV_OK;
}

// Recycled slots, read back through CE: keep one page of each root so that no root goes back to
// PMM, dirty and free the rest, and allocate as many again: every slot is then a recycled one.
// Without FLAGS_ZERO it still holds the pattern (the check can see old data); with FLAGS_ZERO it
// reads zero, after several bounded zeroing pushes. Then, forced non-zero roots: everything is
// freed (roots back to PMM, dirty), the test makes KVC ignore PMM's is_zero, and new pages must
// read zero whichever chunks PMM hands out. Every page is freed again on any failure.
static NV_STATUS kvc_test_zeroing(uvm_va_space_t *va_space, uvm_gpu_t *gpu, const NvProcessorUuid *uuid)
{
    NvU64 *handles = uvm_kvmalloc_zero(KVC_TEST_ZERO_PAGES * sizeof(*handles));
    NvU64 keep[DIV_ROUND_UP(KVC_TEST_ZERO_PAGES, KVC_TEST_SLOTS_PER_ROOT)];
    NvU64 i, n = 0, kept = 0, live = 0, roots;
    uvm_kvc_va_space_t *kvc = NULL;
    uvm_mem_t *buf = NULL;
    NV_STATUS status = NV_OK;

    if (!handles)
        return NV_ERR_NO_MEMORY;

    TEST_NV_CHECK_GOTO(uvm_mem_alloc_sysmem_and_map_cpu_kernel(UVM_PAGE_SIZE_64K, current->mm, &buf), out_free);
    TEST_NV_CHECK_GOTO(uvm_mem_map_gpu_kernel(buf, gpu), out_free);

    uvm_va_space_down_read(va_space);
    kvc = kvc_test_state(va_space, uuid, gpu, &status);
    if (!kvc)
        goto out;
    TEST_CHECK_GOTO(uvm_kvc_bytes_held(kvc, gpu) == 0, out);

    TEST_NV_CHECK_GOTO(uvm_kvc_alloc_pages(kvc, gpu, UVM_KVC_PAGE_SIZE_64K, 0, KVC_TEST_ZERO_PAGES, handles), out);
    for (i = 0; i < KVC_TEST_ZERO_PAGES; i++) {
        if (i % KVC_TEST_SLOTS_PER_ROOT == 0)
            keep[kept++] = handles[i];
        else
            handles[n++] = handles[i];
    }
    live = n;
    roots = uvm_kvc_bytes_held(kvc, gpu);
    TEST_CHECK_GOTO(roots == kept * UVM_CHUNK_SIZE_MAX, out);

    // Negative control: recycled without ZERO, the old data is still there.
    TEST_NV_CHECK_GOTO(kvc_test_fill(kvc, gpu, handles, n, KVC_TEST_PATTERN), out);
    TEST_NV_CHECK_GOTO(uvm_kvc_free_pages(kvc, 0, n, handles), out);
    live = 0;
    TEST_NV_CHECK_GOTO(uvm_kvc_alloc_pages(kvc, gpu, UVM_KVC_PAGE_SIZE_64K, 0, n, handles), out);
    live = n;
    TEST_CHECK_GOTO(uvm_kvc_bytes_held(kvc, gpu) == roots, out);
    TEST_NV_CHECK_GOTO(kvc_test_expect(kvc, gpu, handles, n, KVC_TEST_PATTERN, buf), out);

    // With ZERO: zeros.
    TEST_NV_CHECK_GOTO(uvm_kvc_free_pages(kvc, 0, n, handles), out);
    live = 0;
    TEST_NV_CHECK_GOTO(uvm_kvc_alloc_pages(kvc, gpu, UVM_KVC_PAGE_SIZE_64K, UVM_KVC_ALLOC_FLAGS_ZERO, n, handles), out);
    live = n;
    TEST_CHECK_GOTO(uvm_kvc_bytes_held(kvc, gpu) == roots, out);
    TEST_NV_CHECK_GOTO(kvc_test_expect(kvc, gpu, handles, n, 0, buf), out);

    // Forced non-zero roots: dirty every page, give every root back, take as many again.
    TEST_NV_CHECK_GOTO(kvc_test_fill(kvc, gpu, handles, n, KVC_TEST_PATTERN), out);
    TEST_NV_CHECK_GOTO(kvc_test_fill(kvc, gpu, keep, kept, KVC_TEST_PATTERN), out);
    TEST_NV_CHECK_GOTO(uvm_kvc_free_pages(kvc, 0, n, handles), out);
    live = 0;
    TEST_NV_CHECK_GOTO(uvm_kvc_free_pages(kvc, 0, kept, keep), out);
    kept = 0;
    TEST_CHECK_GOTO(uvm_kvc_bytes_held(kvc, gpu) == 0, out);
    kvc->test.ignore_is_zero = true;
    status = uvm_kvc_alloc_pages(kvc, gpu, UVM_KVC_PAGE_SIZE_64K, 0, KVC_TEST_ZERO_PAGES, handles);
    kvc->test.ignore_is_zero = false;
    TEST_NV_CHECK_GOTO(status, out);
    live = KVC_TEST_ZERO_PAGES;
    TEST_NV_CHECK_GOTO(kvc_test_expect(kvc, gpu, handles, KVC_TEST_ZERO_PAGES, 0, buf), out);

out:
    if (kvc && live)
        (void)uvm_kvc_free_pages(kvc, 0, live, handles);
    if (kvc && kept)
        (void)uvm_kvc_free_pages(kvc, 0, kept, keep);
    if (kvc && status == NV_OK && uvm_kvc_bytes_held(kvc, gpu) != 0) {
        UVM_TEST_PRINT("KVC pool not empty after freeing every page\n");
        status = NV_ERR_INVALID_STATE;
    }
    uvm_va_space_up_read(va_space);
out_free:
    if (buf)
        uvm_mem_free(buf);
    uvm_kvfree(handles);
    return status;
}

// va_space lock held: the PTE KVC keeps for `va` read back through CE equals what KVC wrote (0
// where nothing is mapped).
static NV_STATUS kvc_test_pte(uvm_kvc_va_space_t *kvc, uvm_gpu_t *gpu, NvU64 va, bool mapped, uvm_mem_t *buf)
{
    const NvU64 *cpu = uvm_mem_get_cpu_addr_kernel(buf);
    uvm_gpu_phys_address_t entry;
    NvU64 expected;

    TEST_NV_CHECK_RET(uvm_kvc_block_pte(kvc, gpu, va, &entry, &expected));
    TEST_CHECK_RET(mapped == (expected != 0));
    TEST_NV_CHECK_RET(kvc_test_read(gpu, entry, sizeof(NvU64), buf));
    if (cpu[0] != expected) {
        UVM_TEST_PRINT("KVC PTE for 0x%llx is 0x%llx, expected 0x%llx\n", va, cpu[0], expected);
        return NV_ERR_INVALID_STATE;
    }
    return NV_OK;
}

static NV_STATUS kvc_test_ptes(uvm_va_space_t *va_space, uvm_gpu_t *gpu, NvU64 base, bool mapped[4])
{
    uvm_kvc_va_space_t *kvc;
    uvm_mem_t *buf = NULL;
    NV_STATUS status;
    NvU64 i;

    TEST_NV_CHECK_RET(uvm_mem_alloc_sysmem_and_map_cpu_kernel(UVM_PAGE_SIZE_64K, current->mm, &buf));
    status = uvm_mem_map_gpu_kernel(buf, gpu);
    uvm_va_space_down_read(va_space);
    kvc = status == NV_OK ? uvm_kvc_get(va_space, false, &status) : NULL;
    for (i = 0; kvc && status == NV_OK && i < 4; i++)
        status = kvc_test_pte(kvc, gpu, base + i * UVM_PAGE_SIZE_64K, mapped[i], buf);
    uvm_va_space_up_read(va_space);
    uvm_mem_free(buf);
    return status;
}

static NV_STATUS kvc_test_refs(uvm_va_space_t *va_space,
                               uvm_gpu_t *gpu,
                               const NvProcessorUuid *uuid,
                               NvU64 base,
                               NvU64 iterations)
{
    UVM_KVC_SCATTER_ENTRY entries[4];
    NvU64 handles[4], freeing[3], phys, size, refs, it, i;
    bool all[4] = { true, true, true, true }, some[4] = { true, false, true, true }, none[4] = { false };
    uvm_kvc_va_space_t *kvc;
    NV_STATUS status = NV_OK;

    for (it = 0; it < iterations; it++) {
        if (fatal_signal_pending(current))
            return NV_ERR_SIGNAL_PENDING;

        uvm_va_space_down_read(va_space);
        kvc = kvc_test_state(va_space, uuid, gpu, &status);
        if (kvc)
            status = uvm_kvc_alloc_pages(kvc, gpu, UVM_KVC_PAGE_SIZE_64K, 0, 4, handles);
        uvm_va_space_up_read(va_space);
        TEST_NV_CHECK_RET(status);

        for (i = 0; i < 4; i++) {
            entries[i].va = base + i * UVM_PAGE_SIZE_64K;
            entries[i].handle = handles[i];
        }
        TEST_NV_CHECK_RET(uvm_kvc_map(va_space, uuid, 0, entries, 4, 0));
        TEST_NV_CHECK_RET(kvc_test_ptes(va_space, gpu, base, all));

        // NO_REPLACE over a live mapping is refused.
        TEST_CHECK_RET(uvm_kvc_map(va_space, uuid, UVM_KVC_MAP_FLAGS_NO_REPLACE, entries, 1, 0) == NV_ERR_UVM_ADDRESS_IN_USE);

        // Overlapping entries are refused.
        entries[1].va = entries[0].va;
        TEST_CHECK_RET(uvm_kvc_map(va_space, uuid, 0, entries, 2, 0) == NV_ERR_INVALID_ARGUMENT);

        uvm_va_space_down_read(va_space);
        for (i = 0; i < 4; i++) {
            TEST_NV_CHECK_GOTO(uvm_kvc_handle_info(kvc, handles[i], &phys, &size, &refs), unlock);
            TEST_CHECK_GOTO(refs == 1, unlock);
        }
        // FREE while mapped: FAIL_IF_MAPPED refuses; a plain FREE drops the handle and the
        // memory stays until the unmap.
        freeing[0] = handles[0];
        TEST_CHECK_GOTO(uvm_kvc_free_pages(kvc, UVM_KVC_FREE_FLAGS_FAIL_IF_MAPPED, 1, freeing) == NV_ERR_IN_USE, unlock);
        TEST_NV_CHECK_GOTO(uvm_kvc_free_pages(kvc, 0, 1, freeing), unlock);
        TEST_CHECK_GOTO(uvm_kvc_bytes_held(kvc, gpu) == UVM_CHUNK_SIZE_MAX, unlock);
        uvm_va_space_up_read(va_space);

        // Partial unmap; the other pages keep their reference.
        TEST_NV_CHECK_RET(uvm_kvc_unmap(va_space, uuid, base + UVM_PAGE_SIZE_64K, UVM_PAGE_SIZE_64K));
        TEST_NV_CHECK_RET(kvc_test_ptes(va_space, gpu, base, some));
        uvm_va_space_down_read(va_space);
        TEST_NV_CHECK_GOTO(uvm_kvc_handle_info(kvc, handles[1], &phys, &size, &refs), unlock);
        TEST_CHECK_GOTO(refs == 0, unlock);
        TEST_NV_CHECK_GOTO(uvm_kvc_handle_info(kvc, handles[2], &phys, &size, &refs), unlock);
        TEST_CHECK_GOTO(refs == 1, unlock);
        uvm_va_space_up_read(va_space);

        // Remap page 3's VA with page 1 (replace): page 3 loses its reference, the PTE changes.
        entries[0].va = base + 3 * UVM_PAGE_SIZE_64K;
        entries[0].handle = handles[1];
        TEST_NV_CHECK_RET(uvm_kvc_map(va_space, uuid, 0, entries, 1, 0));
        TEST_NV_CHECK_RET(kvc_test_ptes(va_space, gpu, base, some));
        uvm_va_space_down_read(va_space);
        TEST_NV_CHECK_GOTO(uvm_kvc_handle_info(kvc, handles[3], &phys, &size, &refs), unlock);
        TEST_CHECK_GOTO(refs == 0, unlock);
        uvm_va_space_up_read(va_space);

        // Unmap everything: the freed page 0 goes back with its root once all are freed.
        TEST_NV_CHECK_RET(uvm_kvc_unmap(va_space, uuid, base, 4 * UVM_PAGE_SIZE_64K));
        TEST_NV_CHECK_RET(kvc_test_ptes(va_space, gpu, base, none));
        uvm_va_space_down_read(va_space);
        TEST_CHECK_GOTO(uvm_kvc_handle_info(kvc, handles[0], &phys, &size, &refs) == NV_ERR_INVALID_OBJECT_HANDLE, unlock);
        memcpy(freeing, &handles[1], sizeof(freeing));
        TEST_NV_CHECK_GOTO(uvm_kvc_free_pages(kvc, 0, 3, freeing), unlock);
        TEST_CHECK_GOTO(uvm_kvc_bytes_held(kvc, gpu) == 0, unlock);
        uvm_va_space_up_read(va_space);
    }
    return NV_OK;

unlock:
    uvm_va_space_up_read(va_space);
    return status;
}

NV_STATUS uvm_test_kvc_sanity(UVM_KVC_TEST_SANITY_PARAMS *params, struct file *filp)
{
    uvm_va_space_t *va_space = uvm_va_space_get(filp);
    uvm_gpu_t *gpu;
    NV_STATUS status;

    if (params->version != UVM_KVC_ABI_VERSION)
        return NV_ERR_NOT_SUPPORTED;
    if (params->flags != 0)
        return NV_ERR_INVALID_FLAGS;
    if (params->reserved != 0 || params->pad0 != 0 || params->injectFailAfter != 0)
        return NV_ERR_INVALID_ARGUMENT;
    if (params->length < UVM_CHUNK_SIZE_MAX || !IS_ALIGNED(params->base, UVM_CHUNK_SIZE_MAX) ||
        !IS_ALIGNED(params->length, UVM_CHUNK_SIZE_MAX) || uvm_api_range_invalid_64k(params->base, params->length))
        return NV_ERR_INVALID_ADDRESS;
    if (params->iterations > KVC_TEST_MAX_ITERATIONS)
        return NV_ERR_INVALID_LIMIT;

    uvm_va_space_down_read(va_space);
    gpu = uvm_va_space_get_gpu_by_uuid_with_gpu_va_space(va_space, &params->gpuUuid);
    if (gpu)
        uvm_gpu_retain(gpu);
    uvm_va_space_up_read(va_space);
    if (!gpu)
        return NV_ERR_INVALID_DEVICE;

    status = kvc_test_table(va_space, gpu, &params->gpuUuid);
    if (status == NV_OK)
        status = kvc_test_zeroing(va_space, gpu, &params->gpuUuid);
    if (status == NV_OK)
        status = uvm_kvc_create_range(va_space, params->base, params->length);
    if (status == NV_OK)
        status = kvc_test_refs(va_space, gpu, &params->gpuUuid, params->base,
                               params->iterations ? params->iterations : 1);

    uvm_gpu_release(gpu);
    return status;
}

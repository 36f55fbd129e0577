/*
 * uvm_kvc_test.c: kernel self-test for the KVC ioctls (UVM_KVC_TEST_SANITY), reachable only when
 * nvidia-uvm is loaded with uvm_enable_builtin_tests=1 (routed through uvm_test_ioctl()).
 *
 * Needs a GPU registered with a GPU VA space on the calling fd, and an unused PROT_NONE region
 * [base, base + length) (>= 2 MiB, 64K aligned), which it turns into a KVC range and leaves in
 * place: the caller frees it with UVM_FREE. Checks: handle table (alloc/free round trips, stale
 * handles after reuse, duplicates and bad inputs refused with nothing changed), 128K/256K slot
 * alignment, pool accounting back to zero, recycled pages read back through CE (old data without
 * FLAGS_ZERO, zeros with it, over several zeroing pushes),
 * mapping references (map, FREE while mapped, partial unmap splitting a mapping, replace on
 * remap) and that all memory returns to PMM.
 *
 * The GPU is retained for the whole test and looked up again under each va_space lock section
 * that allocates on it: another thread of the caller may unregister it in between, and then the
 * test fails with NV_ERR_INVALID_DEVICE instead of allocating on a GPU the va_space lost.
 */

#include "uvm_kvc.h"
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

/* va_space lock held: is `gpu` still the one registered (with a GPU VA space) under `uuid`? */
static NV_STATUS kvc_test_gpu_current(uvm_va_space_t *va_space, const NvProcessorUuid *uuid, uvm_gpu_t *gpu)
{
    return uvm_va_space_get_gpu_by_uuid_with_gpu_va_space(va_space, uuid) == gpu ? NV_OK : NV_ERR_INVALID_DEVICE;
}

static NV_STATUS kvc_test_table(uvm_va_space_t *va_space, uvm_gpu_t *gpu, const NvProcessorUuid *uuid)
{
    NvU64 *handles = uvm_kvmalloc_zero(KVC_TEST_PAGES * sizeof(*handles));
    NvU64 stale, again[2], phys, size, refs;
    NV_STATUS status = NV_OK;
    NvU64 i;

    if (!handles)
        return NV_ERR_NO_MEMORY;

    uvm_va_space_down_read(va_space);
    TEST_NV_CHECK_GOTO(kvc_test_gpu_current(va_space, uuid, gpu), out);

    /* 40 x 64K needs two roots; all of it goes back on free. */
    TEST_NV_CHECK_GOTO(uvm_kvc_alloc_pages(va_space, gpu, UVM_KVC_PAGE_SIZE_64K, 0, KVC_TEST_PAGES, handles), out);
    TEST_CHECK_GOTO(uvm_kvc_bytes_allocated(va_space, gpu) == 2 * UVM_CHUNK_SIZE_MAX, out);
    for (i = 0; i < KVC_TEST_PAGES; i++) {
        TEST_NV_CHECK_GOTO(uvm_kvc_handle_phys(va_space, handles[i], &phys, &size, &refs), out);
        TEST_CHECK_GOTO(size == UVM_PAGE_SIZE_64K && refs == 0 && IS_ALIGNED(phys, UVM_PAGE_SIZE_64K), out);
    }

    /* Duplicates: refused, nothing freed. */
    again[0] = handles[0];
    again[1] = handles[0];
    TEST_CHECK_GOTO(uvm_kvc_free_pages(va_space, 0, 2, again) == NV_ERR_INVALID_ARGUMENT, out);
    TEST_NV_CHECK_GOTO(uvm_kvc_handle_phys(va_space, handles[0], &phys, &size, &refs), out);

    /* Unknown handle in the middle of a batch: refused, nothing freed. */
    again[0] = handles[1];
    again[1] = 0x1234ULL << 32 | 0x7fffffff;
    TEST_CHECK_GOTO(uvm_kvc_free_pages(va_space, 0, 2, again) == NV_ERR_INVALID_OBJECT_HANDLE, out);
    TEST_NV_CHECK_GOTO(uvm_kvc_handle_phys(va_space, handles[1], &phys, &size, &refs), out);

    TEST_NV_CHECK_GOTO(uvm_kvc_free_pages(va_space, 0, KVC_TEST_PAGES, handles), out);
    TEST_CHECK_GOTO(uvm_kvc_bytes_allocated(va_space, gpu) == 0, out);

    /* Stale handle after id reuse: the generation makes it differ. */
    stale = handles[0];
    TEST_CHECK_GOTO(uvm_kvc_free_pages(va_space, 0, 1, &stale) == NV_ERR_INVALID_OBJECT_HANDLE, out);
    TEST_NV_CHECK_GOTO(uvm_kvc_alloc_pages(va_space, gpu, UVM_KVC_PAGE_SIZE_64K, 0, 1, &again[0]), out);
    TEST_CHECK_GOTO(again[0] != stale, out);
    TEST_CHECK_GOTO(uvm_kvc_handle_phys(va_space, stale, &phys, &size, &refs) == NV_ERR_INVALID_OBJECT_HANDLE, out);

    /* 128K and 256K pages are naturally aligned runs of slots. */
    TEST_NV_CHECK_GOTO(uvm_kvc_alloc_pages(va_space, gpu, UVM_KVC_PAGE_SIZE_256K, UVM_KVC_ALLOC_FLAGS_ZERO, 1, &again[1]), out);
    TEST_NV_CHECK_GOTO(uvm_kvc_handle_phys(va_space, again[1], &phys, &size, &refs), out);
    TEST_CHECK_GOTO(size == UVM_KVC_PAGE_SIZE_256K && IS_ALIGNED(phys, UVM_KVC_PAGE_SIZE_256K), out);
    TEST_NV_CHECK_GOTO(uvm_kvc_free_pages(va_space, 0, 2, again), out);
    TEST_CHECK_GOTO(uvm_kvc_bytes_allocated(va_space, gpu) == 0, out);

out:
    uvm_va_space_up_read(va_space);
    uvm_kvfree(handles);
    return status;
}

#define KVC_TEST_PATTERN 0xa5a5a5a5a5a5a5a5ULL

/* va_space lock held, no KVC lock: CE-fill every 64K page of `handles` with `value`, waited on.
 * The addresses are looked up (under the KVC lock) before the push begins: no push is ever open
 * while the KVC lock is taken. */
static NV_STATUS kvc_test_fill(uvm_va_space_t *va_space, uvm_gpu_t *gpu, const NvU64 *handles, NvU64 n, NvU64 value)
{
    NvU64 *phys = uvm_kvmalloc(n * sizeof(*phys));
    NvU64 i, size, refs;
    uvm_push_t push;
    NV_STATUS status = NV_OK;

    if (!phys)
        return NV_ERR_NO_MEMORY;
    for (i = 0; i < n && status == NV_OK; i++) {
        status = uvm_kvc_handle_phys(va_space, handles[i], &phys[i], &size, &refs);
        if (status == NV_OK && size != UVM_PAGE_SIZE_64K)
            status = NV_ERR_INVALID_STATE;
    }

    /* At most KVC_TEST_ZERO_PAGES memsets: well inside one push. */
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

/* va_space lock held, no KVC lock: does every 64K page of `handles` read back as `value`?
 * Each page is CE-copied into a sysmem buffer and compared on the CPU. */
static NV_STATUS kvc_test_expect(uvm_va_space_t *va_space,
                                 uvm_gpu_t *gpu,
                                 const NvU64 *handles,
                                 NvU64 n,
                                 NvU64 value,
                                 uvm_mem_t *buf)
{
    const NvU64 *cpu = uvm_mem_get_cpu_addr_kernel(buf);
    NvU64 i, j, phys, size, refs;
    uvm_push_t push;
    NV_STATUS status = NV_OK;

    for (i = 0; i < n && status == NV_OK; i++) {
        TEST_NV_CHECK_RET(uvm_kvc_handle_phys(va_space, handles[i], &phys, &size, &refs));
        TEST_CHECK_RET(size == UVM_PAGE_SIZE_64K);
        TEST_NV_CHECK_RET(uvm_push_begin(gpu->channel_manager, UVM_CHANNEL_TYPE_GPU_INTERNAL, &push, "KVC test read"));
        gpu->parent->ce_hal->memcopy(&push,
                                     uvm_mem_gpu_address_virtual_kernel(buf, gpu),
                                     uvm_gpu_address_copy(gpu, uvm_gpu_phys_address(UVM_APERTURE_VID, phys)),
                                     size);
        TEST_NV_CHECK_RET(uvm_push_end_and_wait(&push));
        for (j = 0; j < size / sizeof(*cpu); j++) {
            if (cpu[j] != value) {
                UVM_TEST_PRINT("KVC page %llu of %llu: word %llu is 0x%llx, expected 0x%llx\n", i, n, j, cpu[j], value);
                status = NV_ERR_INVALID_STATE;
                break;
            }
        }
    }
    return status;
}

/* Recycled slots, read back through CE: keep one page of each root (slots fill roots in order)
 * so that no root goes back to PMM, dirty and free the rest, and allocate as many again: every
 * slot is then a recycled one. Without FLAGS_ZERO it still holds the pattern (the check can see
 * old data); with FLAGS_ZERO it reads zero, after several bounded zeroing pushes, and no new root
 * is needed either time. Every page is freed again on any failure. */
static NV_STATUS kvc_test_recycled_zero(uvm_va_space_t *va_space, uvm_gpu_t *gpu, const NvProcessorUuid *uuid)
{
    NvU64 *handles = uvm_kvmalloc_zero(KVC_TEST_ZERO_PAGES * sizeof(*handles));
    NvU64 keep[DIV_ROUND_UP(KVC_TEST_ZERO_PAGES, KVC_TEST_SLOTS_PER_ROOT)];
    NvU64 i, n = 0, kept = 0, live = 0, roots;
    uvm_mem_t *buf = NULL;
    NV_STATUS status = NV_OK;

    if (!handles)
        return NV_ERR_NO_MEMORY;

    TEST_NV_CHECK_GOTO(uvm_mem_alloc_sysmem_and_map_cpu_kernel(UVM_PAGE_SIZE_64K, current->mm, &buf), out_free);
    TEST_NV_CHECK_GOTO(uvm_mem_map_gpu_kernel(buf, gpu), out_free);

    uvm_va_space_down_read(va_space);
    TEST_NV_CHECK_GOTO(kvc_test_gpu_current(va_space, uuid, gpu), out);
    TEST_CHECK_GOTO(uvm_kvc_bytes_allocated(va_space, gpu) == 0, out);

    TEST_NV_CHECK_GOTO(uvm_kvc_alloc_pages(va_space, gpu, UVM_KVC_PAGE_SIZE_64K, 0, KVC_TEST_ZERO_PAGES, handles), out);
    for (i = 0; i < KVC_TEST_ZERO_PAGES; i++) {
        if (i % KVC_TEST_SLOTS_PER_ROOT == 0)
            keep[kept++] = handles[i];
        else
            handles[n++] = handles[i];
    }
    live = n;
    roots = uvm_kvc_bytes_allocated(va_space, gpu);
    TEST_CHECK_GOTO(roots == kept * UVM_CHUNK_SIZE_MAX, out);

    /* Negative control: recycled without ZERO, the old data is still there. */
    TEST_NV_CHECK_GOTO(kvc_test_fill(va_space, gpu, handles, n, KVC_TEST_PATTERN), out);
    TEST_NV_CHECK_GOTO(uvm_kvc_free_pages(va_space, 0, n, handles), out);
    live = 0;
    TEST_NV_CHECK_GOTO(uvm_kvc_alloc_pages(va_space, gpu, UVM_KVC_PAGE_SIZE_64K, 0, n, handles), out);
    live = n;
    TEST_CHECK_GOTO(uvm_kvc_bytes_allocated(va_space, gpu) == roots, out);
    TEST_NV_CHECK_GOTO(kvc_test_expect(va_space, gpu, handles, n, KVC_TEST_PATTERN, buf), out);

    /* With ZERO: zeros. */
    TEST_NV_CHECK_GOTO(uvm_kvc_free_pages(va_space, 0, n, handles), out);
    live = 0;
    TEST_NV_CHECK_GOTO(uvm_kvc_alloc_pages(va_space, gpu, UVM_KVC_PAGE_SIZE_64K, UVM_KVC_ALLOC_FLAGS_ZERO, n, handles), out);
    live = n;
    TEST_CHECK_GOTO(uvm_kvc_bytes_allocated(va_space, gpu) == roots, out);
    TEST_NV_CHECK_GOTO(kvc_test_expect(va_space, gpu, handles, n, 0, buf), out);

out:
    if (live)
        (void)uvm_kvc_free_pages(va_space, 0, live, handles);
    if (kept)
        (void)uvm_kvc_free_pages(va_space, 0, kept, keep);
    if (status == NV_OK && uvm_kvc_bytes_allocated(va_space, gpu) != 0) {
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

static NV_STATUS kvc_test_refs(uvm_va_space_t *va_space,
                               uvm_gpu_t *gpu,
                               const NvProcessorUuid *uuid,
                               NvU64 base,
                               NvU64 iterations)
{
    UVM_KVC_SCATTER_ENTRY entries[4];
    NvU64 handles[4], phys, size, refs, it, i;
    NV_STATUS status = NV_OK;

    for (it = 0; it < iterations; it++) {
        if (fatal_signal_pending(current))
            return NV_ERR_SIGNAL_PENDING;

        uvm_va_space_down_read(va_space);
        status = kvc_test_gpu_current(va_space, uuid, gpu);
        if (status == NV_OK)
            status = uvm_kvc_alloc_pages(va_space, gpu, UVM_KVC_PAGE_SIZE_64K, 0, 4, handles);
        uvm_va_space_up_read(va_space);
        TEST_NV_CHECK_RET(status);

        for (i = 0; i < 4; i++) {
            entries[i].va = base + i * UVM_PAGE_SIZE_64K;
            entries[i].handle = handles[i];
        }
        TEST_NV_CHECK_RET(uvm_kvc_map_scatter(va_space, uuid, 0, entries, 4));

        /* NO_REPLACE over a live mapping is refused. */
        TEST_CHECK_RET(uvm_kvc_map_scatter(va_space, uuid, UVM_KVC_MAP_FLAGS_NO_REPLACE, entries, 1) ==
                       NV_ERR_UVM_ADDRESS_IN_USE);

        /* Overlapping entries are refused. */
        entries[1].va = entries[0].va;
        TEST_CHECK_RET(uvm_kvc_map_scatter(va_space, uuid, 0, entries, 2) == NV_ERR_INVALID_ARGUMENT);
        entries[1].va = base + UVM_PAGE_SIZE_64K;

        uvm_va_space_down_read(va_space);
        for (i = 0; i < 4; i++) {
            TEST_NV_CHECK_GOTO(uvm_kvc_handle_phys(va_space, handles[i], &phys, &size, &refs), unlock);
            TEST_CHECK_GOTO(refs == 1, unlock);
        }
        /* FREE while mapped: FAIL_IF_MAPPED refuses; a plain FREE drops the handle and the
         * memory stays until the unmap. */
        TEST_CHECK_GOTO(uvm_kvc_free_pages(va_space, UVM_KVC_FREE_FLAGS_FAIL_IF_MAPPED, 1, &handles[0]) ==
                        NV_ERR_IN_USE, unlock);
        TEST_NV_CHECK_GOTO(uvm_kvc_free_pages(va_space, 0, 1, &handles[0]), unlock);
        TEST_CHECK_GOTO(uvm_kvc_bytes_allocated(va_space, gpu) == UVM_CHUNK_SIZE_MAX, unlock);
        uvm_va_space_up_read(va_space);

        /* Partial unmap splits the mapping; the other pages keep their reference. */
        TEST_NV_CHECK_RET(uvm_kvc_unmap(va_space, uuid, base + UVM_PAGE_SIZE_64K, UVM_PAGE_SIZE_64K));
        uvm_va_space_down_read(va_space);
        TEST_NV_CHECK_GOTO(uvm_kvc_handle_phys(va_space, handles[1], &phys, &size, &refs), unlock);
        TEST_CHECK_GOTO(refs == 0, unlock);
        TEST_NV_CHECK_GOTO(uvm_kvc_handle_phys(va_space, handles[2], &phys, &size, &refs), unlock);
        TEST_CHECK_GOTO(refs == 1, unlock);
        uvm_va_space_up_read(va_space);

        /* Remap page 3's VA with page 1 (replace): page 3 loses its reference. */
        entries[0].va = base + 3 * UVM_PAGE_SIZE_64K;
        entries[0].handle = handles[1];
        TEST_NV_CHECK_RET(uvm_kvc_map_scatter(va_space, uuid, 0, entries, 1));
        uvm_va_space_down_read(va_space);
        TEST_NV_CHECK_GOTO(uvm_kvc_handle_phys(va_space, handles[3], &phys, &size, &refs), unlock);
        TEST_CHECK_GOTO(refs == 0, unlock);
        uvm_va_space_up_read(va_space);

        /* Unmap everything: the freed page 0 goes back to PMM with its root once all are freed. */
        TEST_NV_CHECK_RET(uvm_kvc_unmap(va_space, uuid, base, 4 * UVM_PAGE_SIZE_64K));
        uvm_va_space_down_read(va_space);
        TEST_CHECK_GOTO(uvm_kvc_handle_phys(va_space, handles[0], &phys, &size, &refs) ==
                        NV_ERR_INVALID_OBJECT_HANDLE, unlock);
        TEST_NV_CHECK_GOTO(uvm_kvc_free_pages(va_space, 0, 3, &handles[1]), unlock);
        TEST_CHECK_GOTO(uvm_kvc_bytes_allocated(va_space, gpu) == 0, unlock);
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
    if (params->length < UVM_CHUNK_SIZE_MAX || uvm_api_range_invalid_64k(params->base, params->length))
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
        status = kvc_test_recycled_zero(va_space, gpu, &params->gpuUuid);
    if (status == NV_OK)
        status = uvm_kvc_create_range(va_space, params->base, params->length);
    if (status == NV_OK)
        status = kvc_test_refs(va_space, gpu, &params->gpuUuid, params->base,
                               params->iterations ? params->iterations : 1);

    uvm_gpu_release(gpu);
    return status;
}

/*
 * uvm_kvc.h: fd-owned 64 KiB GPU pages ("KV cache" pages) for nvidia-uvm.
 *
 * Pages are slots of 2 MiB KERNEL-type PMM roots owned by a va_space (one pool per GPU), named
 * by opaque per-va_space handles, and mapped only into external VA ranges that UVM_KVC_CREATE_RANGE
 * created (kvc_owned). A mapping is a uvm_ext_gpu_map_t whose `kvc` member lists the pages of its
 * 64 KiB PTEs, so every stock external-range teardown path (UVM_FREE, UVM_UNMAP_EXTERNAL, GPU VA
 * space unregister, GPU unregister, fd close) drops the page references through
 * uvm_kvc_map_release(). Lock order: VA_SPACE > EXT_RANGE_TREE > KVC > (PAGE_TREE, PUSH, PMM).
 *
 * Design and review: shared/research/uvm-driver-design-memo.md section 4.
 */
#ifndef __UVM_KVC_H__
#define __UVM_KVC_H__

#include "uvm_common.h"
#include "uvm_ioctl.h"
#include "uvm_kvc_ioctl.h"
#include "uvm_va_space.h"
#include "uvm_va_range.h"
#include "uvm_map_external.h"
#include "uvm_kvc_compat.h"

/* Appended to the module version so a patched nvidia-uvm is identifiable (modinfo). */
#define UVM_KVC_MODULE_VERSION_SUFFIX "-kvc1"

/* One 64 KiB PTE of a mapping: the page (handle object) and which of its 64 KiB slots. */
typedef struct
{
    struct uvm_kvc_page_struct *page;
    NvU32 sub;
} uvm_kvc_pte_t;

/* Attached to a uvm_ext_gpu_map_t (member `kvc`): the pages behind its PTEs, in VA order. */
struct uvm_kvc_map_struct
{
    NvU64 count;          /* number of 64 KiB PTEs */
    uvm_prot_t prot;
    uvm_kvc_pte_t ptes[];
};
typedef struct uvm_kvc_map_struct uvm_kvc_map_t;

/* ioctl entry points (uvm.c routes them; uvm_test.c routes the self-test) */
NV_STATUS uvm_api_kvc_query(UVM_KVC_QUERY_PARAMS *params, struct file *filp);
NV_STATUS uvm_api_kvc_alloc(UVM_KVC_ALLOC_PARAMS *params, struct file *filp);
NV_STATUS uvm_api_kvc_free(UVM_KVC_FREE_PARAMS *params, struct file *filp);
NV_STATUS uvm_api_kvc_create_range(UVM_KVC_CREATE_RANGE_PARAMS *params, struct file *filp);
NV_STATUS uvm_api_kvc_map(UVM_KVC_MAP_PARAMS *params, struct file *filp);
NV_STATUS uvm_api_kvc_map_scatter(UVM_KVC_MAP_SCATTER_PARAMS *params, struct file *filp);
NV_STATUS uvm_api_kvc_unmap(UVM_KVC_UNMAP_PARAMS *params, struct file *filp);
NV_STATUS uvm_test_kvc_sanity(UVM_KVC_TEST_SANITY_PARAMS *params, struct file *filp);

/* Hooks called from stock code */

/* unregister_gpu(): every handle of `gpu` is invalidated and its roots return to PMM. Called
 * with the va_space lock held for write, after all mappings on the GPU were destroyed. */
void uvm_kvc_unregister_gpu(uvm_va_space_t *va_space, uvm_gpu_t *gpu);

/* uvm_va_space_destroy(): after every GPU was unregistered. */
void uvm_kvc_va_space_destroy(uvm_va_space_t *va_space);

/* uvm_ext_gpu_map_free_internal(): drop the page references of a destroyed mapping. */
void uvm_kvc_map_release(uvm_kvc_map_t *map);

/* uvm_ext_gpu_map_split(): give `new_map` the PTEs from new_start up (prepare may fail and
 * changes nothing; commit shrinks the existing map; abort undoes prepare). */
NV_STATUS uvm_kvc_map_split_prepare(uvm_ext_gpu_map_t *existing_map, NvU64 new_start, uvm_ext_gpu_map_t *new_map);
void uvm_kvc_map_split_commit(uvm_ext_gpu_map_t *existing_map, uvm_ext_gpu_map_t *new_map);
void uvm_kvc_map_split_abort(uvm_ext_gpu_map_t *new_map);

/* Exported by the hooks patch from uvm_map_external.c (a wrapper around the static
 * uvm_unmap_external_in_range). Requires the range tree lock of `gpu`. */
NV_STATUS uvm_kvc_unmap_external_in_range(uvm_kvc_ext_range_t *range,
                                          uvm_gpu_t *gpu,
                                          NvU64 start,
                                          NvU64 end,
                                          struct list_head *deferred_free_list);

/* Internal API shared with the self-test (uvm_kvc_test.c); kernel-memory arrays. */
NV_STATUS uvm_kvc_alloc_pages(uvm_va_space_t *va_space,
                              uvm_gpu_t *gpu,
                              NvU64 page_size,
                              NvU32 flags,
                              NvU64 count,
                              NvU64 *handles);
NV_STATUS uvm_kvc_free_pages(uvm_va_space_t *va_space, NvU32 flags, NvU64 count, const NvU64 *handles);
NV_STATUS uvm_kvc_create_range(uvm_va_space_t *va_space, NvU64 base, NvU64 length);
NV_STATUS uvm_kvc_map_scatter(uvm_va_space_t *va_space,
                              const NvProcessorUuid *gpu_uuid,
                              NvU32 flags,
                              const UVM_KVC_SCATTER_ENTRY *entries,
                              NvU64 count);
NV_STATUS uvm_kvc_unmap(uvm_va_space_t *va_space, const NvProcessorUuid *gpu_uuid, NvU64 base, NvU64 length);
NvU64 uvm_kvc_bytes_allocated(uvm_va_space_t *va_space, uvm_gpu_t *gpu);
NV_STATUS uvm_kvc_handle_phys(uvm_va_space_t *va_space, NvU64 handle, NvU64 *phys, NvU64 *size, NvU64 *refs);

#endif /* __UVM_KVC_H__ */

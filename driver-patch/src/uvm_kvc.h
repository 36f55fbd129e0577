/*
 * uvm_kvc.h: fd-owned 64 KiB GPU pages ("KV cache" pages) for nvidia-uvm: what stock UVM code
 * calls. The feature's own structures are in uvm_kvc_internal.h.
 *
 * Pages are slots of 2 MiB KERNEL-type PMM roots owned by a va_space, named by opaque
 * per-va_space handles, and mapped only into external VA ranges that UVM_KVC_CREATE_RANGE
 * created (kvc_owned, 2 MiB aligned). KVC keeps the page tables of those ranges itself, in 2 MiB
 * blocks, so that one ioctl writes all its PTEs in one batch with one TLB invalidate; stock
 * code calls the hooks below when a range, a GPU VA space, a GPU or the va_space goes away, and
 * refuses its own mapping ioctls on KVC ranges.
 *
 * Design and review: shared/research/uvm-driver-design-memo.md section 4,
 * shared/research/driver-review-2026-12.md, docs/driver.md.
 */
#ifndef __UVM_KVC_H__
#define __UVM_KVC_H__

#include "uvm_common.h"
#include "uvm_ioctl.h"
#include "uvm_kvc_ioctl.h"
#include "uvm_va_space.h"
#include "uvm_va_range.h"
#include "uvm_kvc_compat.h"

// Appended to the module version so a patched nvidia-uvm is identifiable (modinfo).
#define UVM_KVC_MODULE_VERSION_SUFFIX "-kvc2"

// ioctl entry points (uvm.c routes them; uvm_test.c routes the self-test)
NV_STATUS uvm_api_kvc_query(UVM_KVC_QUERY_PARAMS *params, struct file *filp);
NV_STATUS uvm_api_kvc_alloc(UVM_KVC_ALLOC_PARAMS *params, struct file *filp);
NV_STATUS uvm_api_kvc_free(UVM_KVC_FREE_PARAMS *params, struct file *filp);
NV_STATUS uvm_api_kvc_create_range(UVM_KVC_CREATE_RANGE_PARAMS *params, struct file *filp);
NV_STATUS uvm_api_kvc_map(UVM_KVC_MAP_PARAMS *params, struct file *filp);
NV_STATUS uvm_api_kvc_map_scatter(UVM_KVC_MAP_SCATTER_PARAMS *params, struct file *filp);
NV_STATUS uvm_api_kvc_unmap(UVM_KVC_UNMAP_PARAMS *params, struct file *filp);
NV_STATUS uvm_test_kvc_sanity(UVM_KVC_TEST_SANITY_PARAMS *params, struct file *filp);

// Hooks called from stock code, all with the va_space lock held for write. Each returns at once
// for a va_space that never used KVC.

// uvm_va_range_destroy_external() (UVM_FREE, fd close): for a kvc_owned range, clears and frees
// its PTEs on every GPU and drops the page references.
void uvm_kvc_range_destroyed(uvm_kvc_ext_range_t *range);

// remove_gpu_va_space(): every KVC PTE in that GPU VA space is cleared and its page tables put,
// before the page tree goes away. Pages stay valid (they belong to the GPU, not its VA space).
void uvm_kvc_remove_gpu_va_space(uvm_va_space_t *va_space, uvm_gpu_t *gpu);

// unregister_gpu(), after remove_gpu_va_space(): every handle of `gpu` is invalidated and its
// roots return to PMM.
void uvm_kvc_unregister_gpu(uvm_va_space_t *va_space, uvm_gpu_t *gpu);

// uvm_va_space_destroy(), after every GPU was unregistered.
void uvm_kvc_va_space_destroy(uvm_va_space_t *va_space);

#endif // __UVM_KVC_H__

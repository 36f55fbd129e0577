/*
 * uvm_kvc_compat.h for nvidia-uvm 535.x / 550.x: external ranges are uvm_va_range_t with an
 * `external` union member; page sizes NvU32; PMM alloc_kernel is a header wrapper; no
 * UVM_FD_TEST. 535.261.03 and 550.163.01 differ only in where the SR-IOV heavy test lives
 * (uvm_gpu_t in 535, uvm_parent_gpu_t from 550 on).
 */
#ifndef __UVM_KVC_COMPAT_H__
#define __UVM_KVC_COMPAT_H__

#include "uvm_va_range.h"
#include "uvm_global.h"

typedef uvm_va_range_t uvm_kvc_ext_range_t;

static inline uvm_kvc_ext_range_t *uvm_kvc_ext_range_find(uvm_va_space_t *va_space, NvU64 addr)
{
    uvm_va_range_t *va_range = uvm_va_range_find(va_space, addr);

    if (!va_range || va_range->type != UVM_VA_RANGE_TYPE_EXTERNAL)
        return NULL;
    return va_range;
}

static inline NV_STATUS uvm_kvc_ext_range_create(uvm_va_space_t *va_space,
                                                 struct mm_struct *mm,
                                                 NvU64 start,
                                                 NvU64 length,
                                                 uvm_kvc_ext_range_t **out)
{
    return uvm_va_range_create_external(va_space, mm, start, length, out);
}

// Stock mapping ioctls (uvm_map_external.c) see no range where KVC keeps the page tables.
static inline uvm_va_range_t *uvm_kvc_hide_range(uvm_va_range_t *va_range)
{
    if (va_range && va_range->type == UVM_VA_RANGE_TYPE_EXTERNAL && va_range->external.kvc_owned)
        return NULL;
    return va_range;
}

#define uvm_kvc_ext_range_node(range)        (&(range)->node)
#define uvm_kvc_ext_range_va_space(range)    ((range)->va_space)
#define uvm_kvc_ext_range_owned(range)       ((range)->external.kvc_owned)
#define uvm_kvc_ext_range_mapped_gpus(range) (&(range)->external.mapped_gpus)
#define uvm_kvc_fd_is_test(type)             (false)
#define uvm_kvc_conf_computing_enabled(gpu)  (g_uvm_global.conf_computing_enabled)
#define uvm_kvc_sparse_supported(gpu)        ((gpu)->parent->sparse_mappings_supported)
#define uvm_kvc_sriov_heavy(gpu)             (uvm_parent_gpu_is_virt_mode_sriov_heavy((gpu)->parent))

#endif /* __UVM_KVC_COMPAT_H__ */

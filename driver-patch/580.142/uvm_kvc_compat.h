/*
 * uvm_kvc_compat.h for nvidia-uvm 565+ (checked on 580.142): external ranges are the subclass
 * uvm_va_range_external_t with a base `va_range`; page sizes NvU64; PMM alloc_kernel exported;
 * UVM_FD_TEST exists.
 */
#ifndef __UVM_KVC_COMPAT_H__
#define __UVM_KVC_COMPAT_H__

#include "uvm_va_range.h"
#include "uvm_global.h"
#include "uvm_fd_type.h"

typedef uvm_va_range_external_t uvm_kvc_ext_range_t;

static inline uvm_kvc_ext_range_t *uvm_kvc_ext_range_find(uvm_va_space_t *va_space, NvU64 addr)
{
    return uvm_va_range_external_find(va_space, addr);
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
static inline uvm_va_range_external_t *uvm_kvc_hide_range(uvm_va_range_external_t *external_range)
{
    if (external_range && external_range->kvc_owned)
        return NULL;
    return external_range;
}

#define uvm_kvc_ext_range_node(range)        (&(range)->va_range.node)
#define uvm_kvc_ext_range_va_space(range)    ((range)->va_range.va_space)
#define uvm_kvc_ext_range_owned(range)       ((range)->kvc_owned)
#define uvm_kvc_ext_range_mapped_gpus(range) (&(range)->mapped_gpus)
#define uvm_kvc_fd_is_test(type)             ((type) == UVM_FD_TEST)
#define uvm_kvc_conf_computing_enabled(gpu)  (g_uvm_global.conf_computing_enabled)
#define uvm_kvc_sparse_supported(gpu)        ((gpu)->parent->sparse_mappings_supported)
#define uvm_kvc_sriov_heavy(gpu)             (uvm_parent_gpu_is_virt_mode_sriov_heavy((gpu)->parent))

#endif /* __UVM_KVC_COMPAT_H__ */

/* DRAFT written by the python side from the memo, for development only */
#ifndef UVM_KVC_IOCTL_H
#define UVM_KVC_IOCTL_H
#ifdef __KERNEL__
#include "uvm_types.h"
#define UVM_KVC_ALIGN8 NV_ALIGN_BYTES(8)
#else
#include <stdint.h>
typedef uint8_t NvU8; typedef uint32_t NvU32; typedef uint64_t NvU64; typedef int32_t NvS32;
typedef NvU32 NV_STATUS;
typedef struct { NvU8 uuid[16]; } NvProcessorUuid;
#define UVM_KVC_ALIGN8 __attribute__((aligned(8)))
#endif

/* UVM_KVC_ABI_BEGIN */
#define UVM_KVC_IOCTL_BASE(i) (1536 + (i))
#define UVM_KVC_ABI_VERSION 1
#define UVM_KVC_MAGIC 0x313043564B4D5655ULL
#define UVM_KVC_PAGE_SIZE_64K (1u << 16)
#define UVM_KVC_MAX_BATCH 4096

#define UVM_KVC_FD_UNINITIALIZED 0
#define UVM_KVC_FD_VA_SPACE 1
#define UVM_KVC_FD_MM 2
#define UVM_KVC_FD_TEST 3

#define UVM_KVC_GPU_REGISTERED (1 << 0)
#define UVM_KVC_GPU_HAS_VA_SPACE (1 << 1)
#define UVM_KVC_GPU_SUPPORTED (1 << 2)

#define UVM_KVC_ALLOC_FLAGS_EVICT (1 << 0)
#define UVM_KVC_ALLOC_FLAGS_ZERO (1 << 1)
#define UVM_KVC_FREE_FLAGS_FAIL_IF_MAPPED (1 << 0)
#define UVM_KVC_MAP_FLAGS_NO_REPLACE (1 << 0)
#define UVM_KVC_MAP_FLAGS_READ_ONLY (1 << 1)

#define UVM_KVC_STATUS_NV_OK 0x00000000
#define UVM_KVC_STATUS_NV_ERR_ILLEGAL_ACTION 0x00000016
#define UVM_KVC_STATUS_NV_ERR_IN_USE 0x00000017
#define UVM_KVC_STATUS_NV_ERR_INSUFFICIENT_RESOURCES 0x0000001A
#define UVM_KVC_STATUS_NV_ERR_INVALID_ADDRESS 0x0000001E
#define UVM_KVC_STATUS_NV_ERR_INVALID_ARGUMENT 0x0000001F
#define UVM_KVC_STATUS_NV_ERR_INVALID_DEVICE 0x00000026
#define UVM_KVC_STATUS_NV_ERR_INVALID_FLAGS 0x00000029
#define UVM_KVC_STATUS_NV_ERR_INVALID_LIMIT 0x0000002E
#define UVM_KVC_STATUS_NV_ERR_INVALID_OBJECT_HANDLE 0x00000033
#define UVM_KVC_STATUS_NV_ERR_NO_MEMORY 0x00000051
#define UVM_KVC_STATUS_NV_ERR_NOT_SUPPORTED 0x00000056
#define UVM_KVC_STATUS_NV_ERR_OUT_OF_RANGE 0x0000005B
#define UVM_KVC_STATUS_NV_ERR_UVM_ADDRESS_IN_USE 0x00000068

#define UVM_KVC_QUERY UVM_KVC_IOCTL_BASE(0)
typedef struct {
    NvU32 version;
    NvU32 flags;
    NvProcessorUuid gpuUuid;               /* in, optional */
    NvU64 magic UVM_KVC_ALIGN8;            /* out */
    NvU64 supportedPageSizes UVM_KVC_ALIGN8;
    NvU32 maxBatch;
    NvU32 fdType;
    NvU32 gpuState;
    NvU32 pad1;
    NvU64 reserved[2] UVM_KVC_ALIGN8;
    NV_STATUS rmStatus;
    NvU32 pad0;
} UVM_KVC_QUERY_PARAMS;

#define UVM_KVC_ALLOC UVM_KVC_IOCTL_BASE(1)
typedef struct {
    NvU32 version;
    NvU32 flags;
    NvProcessorUuid gpuUuid;
    NvU64 pageSize UVM_KVC_ALIGN8;
    NvU64 count UVM_KVC_ALIGN8;
    NvU64 handlesPtr UVM_KVC_ALIGN8;
    NvU64 countDone UVM_KVC_ALIGN8;
    NvU64 reserved UVM_KVC_ALIGN8;
    NV_STATUS rmStatus;
    NvU32 pad0;
} UVM_KVC_ALLOC_PARAMS;

#define UVM_KVC_FREE UVM_KVC_IOCTL_BASE(2)
typedef struct {
    NvU32 version;
    NvU32 flags;
    NvU64 count UVM_KVC_ALIGN8;
    NvU64 handlesPtr UVM_KVC_ALIGN8;
    NvU64 countDone UVM_KVC_ALIGN8;
    NvU64 reserved UVM_KVC_ALIGN8;
    NV_STATUS rmStatus;
    NvU32 pad0;
} UVM_KVC_FREE_PARAMS;

#define UVM_KVC_CREATE_RANGE UVM_KVC_IOCTL_BASE(3)
typedef struct {
    NvU32 version;
    NvU32 flags;
    NvU64 base UVM_KVC_ALIGN8;
    NvU64 length UVM_KVC_ALIGN8;
    NvU64 reserved UVM_KVC_ALIGN8;
    NV_STATUS rmStatus;
    NvU32 pad0;
} UVM_KVC_CREATE_RANGE_PARAMS;

#define UVM_KVC_MAP UVM_KVC_IOCTL_BASE(4)
typedef struct {
    NvU32 version;
    NvU32 flags;
    NvProcessorUuid gpuUuid;
    NvU64 base UVM_KVC_ALIGN8;
    NvU64 count UVM_KVC_ALIGN8;
    NvU64 handlesPtr UVM_KVC_ALIGN8;
    NvU64 countDone UVM_KVC_ALIGN8;
    NvU64 reserved UVM_KVC_ALIGN8;
    NV_STATUS rmStatus;
    NvU32 pad0;
} UVM_KVC_MAP_PARAMS;

typedef struct {
    NvU64 va UVM_KVC_ALIGN8;
    NvU64 handle UVM_KVC_ALIGN8;
} UVM_KVC_SCATTER_ENTRY;

#define UVM_KVC_MAP_SCATTER UVM_KVC_IOCTL_BASE(5)
typedef struct {
    NvU32 version;
    NvU32 flags;
    NvProcessorUuid gpuUuid;
    NvU64 entriesPtr UVM_KVC_ALIGN8;
    NvU64 count UVM_KVC_ALIGN8;
    NvU64 countDone UVM_KVC_ALIGN8;
    NvU64 reserved UVM_KVC_ALIGN8;
    NV_STATUS rmStatus;
    NvU32 pad0;
} UVM_KVC_MAP_SCATTER_PARAMS;

#define UVM_KVC_UNMAP UVM_KVC_IOCTL_BASE(6)
typedef struct {
    NvU32 version;
    NvU32 flags;
    NvProcessorUuid gpuUuid;
    NvU64 base UVM_KVC_ALIGN8;
    NvU64 length UVM_KVC_ALIGN8;
    NvU64 reserved UVM_KVC_ALIGN8;
    NV_STATUS rmStatus;
    NvU32 pad0;
} UVM_KVC_UNMAP_PARAMS;
/* UVM_KVC_ABI_END */
#endif

/*
 * uvm_kvc_ioctl.h: the user/kernel ABI of the nvidia-uvm "KV cache" (KVC) ioctls:
 * fd-owned 64 KiB GPU pages (128/256 KiB as 2/4 consecutive 64 KiB pages) mapped into
 * external VA ranges created by the feature itself. ABI version 2 (version 1 was never loaded
 * anywhere; it is refused like any other mismatch).
 *
 * The same file is used by the kernel patch (driver-patch/src/uvm_kvc.c), by user space
 * (pyvattn/_ffi/uvm.py parses the ABI block below; a byte-identical copy ships in the Python
 * package) and by C tests. Design: shared/research/uvm-driver-design-memo.md section 4.
 *
 * Parseability contract (relied on by pyvattn/_ffi/uvm.py): between the UVM_KVC_ABI_BEGIN and
 * UVM_KVC_ABI_END lines there are only
 *   (a) `#define NAME value`, value an integer literal, a parenthesised arithmetic/shift/or
 *       expression of literals and earlier names, or UVM_KVC_IOCTL_BASE(n)
 *       (the function-like UVM_KVC_IOCTL_BASE itself is skipped by the parser);
 *   (b) `typedef struct { ... } NAME;` with NvU8/NvU32/NvU64/NvS32, NV_STATUS, NvProcessorUuid
 *       and fixed-size arrays; a field may carry UVM_KVC_ALIGN8 after its name;
 *   (c) comments.
 *
 * Layout rules: every struct starts with `NvU32 version; NvU32 flags;` and ends with
 * `NV_STATUS rmStatus; NvU32 pad0;`; every NvU64 sits at an 8-byte-aligned offset through explicit
 * padding, so the layout is the same with or without the alignment attribute (-m32 and -m64,
 * compat_ioctl). Sizes are pinned by the static asserts at the end of this file.
 *
 * Changing anything inside the ABI block is an ABI change: give the ioctl a new number (_V2),
 * as NVIDIA does, rather than changing a struct in place.
 */
#ifndef UVM_KVC_IOCTL_H
#define UVM_KVC_IOCTL_H

#ifdef __KERNEL__
#include "uvm_ioctl.h"          /* UVM_IOCTL_BASE, NvProcessorUuid, NV_STATUS, NV_ALIGN_BYTES */
#define UVM_KVC_ALIGN8 NV_ALIGN_BYTES(8)
#define UVM_KVC_STATIC_ASSERT(cond, msg) _Static_assert(cond, msg)
#else
/* User-space shim: just enough of nvtypes.h / nvCpuUuid.h for this header. */
#include <stddef.h>
#include <stdint.h>
#ifndef NVTYPES_INCLUDED
typedef uint8_t NvU8;
typedef uint32_t NvU32;
typedef uint64_t NvU64;
typedef int32_t NvS32;
#endif
#ifndef NV_STATUS_DEFINED_UVM_KVC
#define NV_STATUS_DEFINED_UVM_KVC
#ifndef SDK_NVSTATUS_H
typedef NvU32 NV_STATUS;
#endif
#endif
#ifndef NV_CPU_UUID_H
typedef struct { NvU8 uuid[16]; } NvProcessorUuid;
#endif
#ifndef UVM_IOCTL_BASE
#define UVM_IOCTL_BASE(i) (i)   /* Linux: plain integers (uvm_ioctl.h) */
#endif
#ifndef UVM_KVC_ALIGN8
#define UVM_KVC_ALIGN8 __attribute__((aligned(8)))
#endif
#if defined(__cplusplus)
#define UVM_KVC_STATIC_ASSERT(cond, msg) static_assert(cond, msg)
#else
#define UVM_KVC_STATIC_ASSERT(cond, msg) _Static_assert(cond, msg)
#endif
#endif

/* UVM_KVC_ABI_BEGIN */
/* Request numbers: 1536 + i, clear of UVM's regular (1..80), test (200..511) and temporary
 * (2047 downwards) numbers, and <= 2047 for the Windows CTL_CODE form. */
#define UVM_KVC_IOCTL_BASE(i) UVM_IOCTL_BASE(1536 + (i))
#define UVM_KVC_ABI_VERSION 2
/* "UVMKVC01" read as a little-endian NvU64 */
#define UVM_KVC_MAGIC 0x313043564B4D5655ULL

/* Page sizes: a handle is 1, 2 or 4 consecutive 64 KiB slots of one 2 MiB root, mapped with
 * 64 KiB PTEs (there are no 128K/256K PTEs in the hardware). QUERY reports the OR of them. */
#define UVM_KVC_PAGE_SIZE_64K (1u << 16)
#define UVM_KVC_PAGE_SIZE_128K (1u << 17)
#define UVM_KVC_PAGE_SIZE_256K (1u << 18)
#define UVM_KVC_SUPPORTED_PAGE_SIZES (UVM_KVC_PAGE_SIZE_64K | UVM_KVC_PAGE_SIZE_128K | UVM_KVC_PAGE_SIZE_256K)
/* Most items (handles or scatter entries) in one ALLOC/FREE/MAP/MAP_SCATTER call: a decode step
 * of 256 requests x 64 regions growing by one page each is one MAP_SCATTER. */
#define UVM_KVC_MAX_BATCH 16384
/* Most VAs one page may be mapped at, at the same time (a bound on kernel metadata per page). */
#define UVM_KVC_MAX_MAPPINGS_PER_PAGE 16

/* QUERY fdType */
#define UVM_KVC_FD_UNINITIALIZED 0
#define UVM_KVC_FD_VA_SPACE 1
#define UVM_KVC_FD_MM 2
#define UVM_KVC_FD_TEST 3

/* QUERY gpuState bits (for gpuUuid) */
#define UVM_KVC_GPU_REGISTERED (1 << 0)
#define UVM_KVC_GPU_HAS_VA_SPACE (1 << 1)
#define UVM_KVC_GPU_SUPPORTED (1 << 2)

/* QUERY callerState bits */
#define UVM_KVC_CALLER_OWNS_VA_SPACE (1 << 0)   /* the caller's process owns this va_space: the other
                                                   KVC ioctls are allowed (a forked child is refused) */

/* QUERY limitFlags bits */
#define UVM_KVC_LIMIT_EVICT_ALLOWED (1 << 0)    /* uvm_kvc_allow_evict: ALLOC may pass FLAGS_EVICT */

/* flags */
#define UVM_KVC_ALLOC_FLAGS_EVICT (1 << 0)
#define UVM_KVC_ALLOC_FLAGS_ZERO (1 << 1)
#define UVM_KVC_FREE_FLAGS_FAIL_IF_MAPPED (1 << 0)
#define UVM_KVC_MAP_FLAGS_NO_REPLACE (1 << 0)
#define UVM_KVC_MAP_FLAGS_READ_ONLY (1 << 1)

/* The NV_STATUS values the feature returns (values identical to nvstatuscodes.h). */
#define UVM_KVC_STATUS_NV_OK 0x00000000
#define UVM_KVC_STATUS_NV_ERR_ILLEGAL_ACTION 0x00000016
#define UVM_KVC_STATUS_NV_ERR_IN_USE 0x00000017
#define UVM_KVC_STATUS_NV_ERR_INSUFFICIENT_RESOURCES 0x0000001A
#define UVM_KVC_STATUS_NV_ERR_INSUFFICIENT_PERMISSIONS 0x0000001B
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

/* Feature probe, fd discovery, limits and usage; works on any UVM fd (no init check). Byte counts
 * are whole 2 MiB roots on gpuUuid (0 without a GPU). Limits of 0 mean "none". 128 bytes. */
#define UVM_KVC_QUERY UVM_KVC_IOCTL_BASE(0)
typedef struct {
    NvU32 version;
    NvU32 flags;
    NvProcessorUuid gpuUuid;               /* in, optional (all zero: no GPU) */
    NvU64 magic UVM_KVC_ALIGN8;            /* out: UVM_KVC_MAGIC */
    NvU64 supportedPageSizes UVM_KVC_ALIGN8; /* out */
    NvU32 maxBatch;                        /* out */
    NvU32 fdType;                          /* out: UVM_KVC_FD_* */
    NvU32 gpuState;                        /* out: UVM_KVC_GPU_* for gpuUuid */
    NvU32 callerState;                     /* out: UVM_KVC_CALLER_* */
    NvU32 maxMappingsPerPage;              /* out: UVM_KVC_MAX_MAPPINGS_PER_PAGE */
    NvU32 limitFlags;                      /* out: UVM_KVC_LIMIT_* */
    NvU64 fdBytes UVM_KVC_ALIGN8;          /* out: what this fd holds */
    NvU64 processBytes UVM_KVC_ALIGN8;     /* out: what the fd's process holds, all its fds */
    NvU64 processLimitBytes UVM_KVC_ALIGN8; /* out: uvm_kvc_max_mb_per_process */
    NvU64 gpuBytes UVM_KVC_ALIGN8;         /* out: what all processes hold */
    NvU64 gpuLimitBytes UVM_KVC_ALIGN8;    /* out: uvm_kvc_max_gpu_percent of the GPU's memory */
    NvU64 metaBytes UVM_KVC_ALIGN8;        /* out: kernel memory the fd's process uses for KVC
                                              bookkeeping (all GPUs) */
    NvU64 metaLimitBytes UVM_KVC_ALIGN8;   /* out: uvm_kvc_max_meta_mb_per_process */
    NV_STATUS rmStatus;
    NvU32 pad0;
} UVM_KVC_QUERY_PARAMS;

/* Allocate `count` pages of `pageSize` on gpuUuid; handles written to handlesPtr
 * (NvU64[count]). All or nothing. Memory new to this fd is always zeroed (no data of another
 * process is ever handed out); a slot this fd freed earlier and now gets again holds its own
 * old data unless FLAGS_ZERO asks for it to be re-zeroed too. Limits (QUERY reports them): the
 * process's cap per GPU (uvm_kvc_max_mb_per_process), all processes' cap per GPU
 * (uvm_kvc_max_gpu_percent) and the process's bookkeeping cap (uvm_kvc_max_meta_mb_per_process)
 * give NV_ERR_INSUFFICIENT_RESOURCES; FLAGS_EVICT without uvm_kvc_allow_evict gives
 * NV_ERR_INSUFFICIENT_PERMISSIONS. 72 bytes. */
#define UVM_KVC_ALLOC UVM_KVC_IOCTL_BASE(1)
typedef struct {
    NvU32 version;
    NvU32 flags;                           /* UVM_KVC_ALLOC_FLAGS_* */
    NvProcessorUuid gpuUuid;
    NvU64 pageSize UVM_KVC_ALIGN8;
    NvU64 count UVM_KVC_ALIGN8;
    NvU64 handlesPtr UVM_KVC_ALIGN8;       /* user NvU64[count], out */
    NvU64 countDone UVM_KVC_ALIGN8;        /* out: 0 or count */
    NvU64 reserved UVM_KVC_ALIGN8;
    NV_STATUS rmStatus;
    NvU32 pad0;
} UVM_KVC_ALLOC_PARAMS;

/* Free handles (validated first: unknown/duplicate fails, nothing freed). A mapped page's
 * memory is released at its last unmap. 48 bytes. */
#define UVM_KVC_FREE UVM_KVC_IOCTL_BASE(2)
typedef struct {
    NvU32 version;
    NvU32 flags;                           /* UVM_KVC_FREE_FLAGS_* */
    NvU64 count UVM_KVC_ALIGN8;
    NvU64 handlesPtr UVM_KVC_ALIGN8;       /* user NvU64[count], in */
    NvU64 countDone UVM_KVC_ALIGN8;
    NvU64 reserved UVM_KVC_ALIGN8;
    NV_STATUS rmStatus;
    NvU32 pad0;
} UVM_KVC_FREE_PARAMS;

/* Create a KVC-owned external range [base, base+length) (64K aligned, at most 2^52 bytes) over
 * a PROT_NONE reservation. Destroy it with the stock UVM_FREE. Stock UVM_MAP_EXTERNAL_*, and
 * UVM_UNMAP_EXTERNAL refuse KVC ranges (NV_ERR_INVALID_ADDRESS). 40 bytes. */
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

/* Map handles[i] back to back from base (each takes its own page size of VA). Synchronous:
 * PTEs written and TLB invalidated on return. Replaces what is mapped there unless NO_REPLACE
 * (then NV_ERR_UVM_ADDRESS_IN_USE). All or nothing: every check and every allocation comes
 * before the first PTE is written, all PTEs of the call are written by one batch of pushes with
 * one TLB invalidate and one wait. 72 bytes. */
#define UVM_KVC_MAP UVM_KVC_IOCTL_BASE(4)
typedef struct {
    NvU32 version;
    NvU32 flags;                           /* UVM_KVC_MAP_FLAGS_* */
    NvProcessorUuid gpuUuid;
    NvU64 base UVM_KVC_ALIGN8;
    NvU64 count UVM_KVC_ALIGN8;
    NvU64 handlesPtr UVM_KVC_ALIGN8;       /* user NvU64[count], in */
    NvU64 countDone UVM_KVC_ALIGN8;
    NvU64 reserved UVM_KVC_ALIGN8;
    NV_STATUS rmStatus;
    NvU32 pad0;
} UVM_KVC_MAP_PARAMS;

/* One MAP_SCATTER item: the handle's pages mapped at va. 16 bytes. */
typedef struct {
    NvU64 va UVM_KVC_ALIGN8;
    NvU64 handle UVM_KVC_ALIGN8;
} UVM_KVC_SCATTER_ENTRY;

/* Map independent pages in one call (all in KVC ranges of one GPU, no two entries overlapping).
 * All or nothing, synchronous, one batch of pushes, one TLB invalidate, one wait. 64 bytes. */
#define UVM_KVC_MAP_SCATTER UVM_KVC_IOCTL_BASE(5)
typedef struct {
    NvU32 version;
    NvU32 flags;                           /* UVM_KVC_MAP_FLAGS_* */
    NvProcessorUuid gpuUuid;
    NvU64 entriesPtr UVM_KVC_ALIGN8;       /* user UVM_KVC_SCATTER_ENTRY[count], in */
    NvU64 count UVM_KVC_ALIGN8;
    NvU64 countDone UVM_KVC_ALIGN8;
    NvU64 reserved UVM_KVC_ALIGN8;
    NV_STATUS rmStatus;
    NvU32 pad0;
} UVM_KVC_MAP_SCATTER_PARAMS;

/* Unmap [base, base+length) of a KVC range on gpuUuid (64K aligned): one push of PTE clears,
 * one TLB invalidate, one wait; a page's memory is released only after that wait. 56 bytes. */
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

/* Kernel self-test; routed through uvm_test_ioctl(), so it only exists when nvidia-uvm is loaded
 * with uvm_enable_builtin_tests=1. [base, base+length) is a PROT_NONE reservation (whole 2 MiB,
 * 2 MiB aligned) the test turns into a KVC range and leaves; gpuUuid must be registered with a
 * GPU VA space on this fd. iterations: 0 means 1, at most 1000. injectFailAfter: must be 0
 * (fault injection is what `make driver-harness` does, at every fallible call). 64 bytes. */
#define UVM_KVC_TEST_SANITY UVM_KVC_IOCTL_BASE(15)
typedef struct {
    NvU32 version;
    NvU32 flags;
    NvProcessorUuid gpuUuid;
    NvU64 base UVM_KVC_ALIGN8;
    NvU64 length UVM_KVC_ALIGN8;
    NvU32 iterations;
    NvU32 injectFailAfter;
    NvU64 reserved UVM_KVC_ALIGN8;
    NV_STATUS rmStatus;
    NvU32 pad0;
} UVM_KVC_TEST_SANITY_PARAMS;
/* UVM_KVC_ABI_END */

/* Pinned sizes and offsets: identical on every ABI (-m32, -m64) and in the kernel. */
UVM_KVC_STATIC_ASSERT(sizeof(NvProcessorUuid) == 16, "NvProcessorUuid is 16 bytes");
UVM_KVC_STATIC_ASSERT(sizeof(UVM_KVC_QUERY_PARAMS) == 128, "UVM_KVC_QUERY_PARAMS size");
UVM_KVC_STATIC_ASSERT(offsetof(UVM_KVC_QUERY_PARAMS, magic) == 24, "QUERY.magic");
UVM_KVC_STATIC_ASSERT(offsetof(UVM_KVC_QUERY_PARAMS, fdBytes) == 64, "QUERY.fdBytes");
UVM_KVC_STATIC_ASSERT(offsetof(UVM_KVC_QUERY_PARAMS, metaLimitBytes) == 112, "QUERY.metaLimitBytes");
UVM_KVC_STATIC_ASSERT(offsetof(UVM_KVC_QUERY_PARAMS, rmStatus) == 120, "QUERY.rmStatus");
UVM_KVC_STATIC_ASSERT(sizeof(UVM_KVC_ALLOC_PARAMS) == 72, "UVM_KVC_ALLOC_PARAMS size");
UVM_KVC_STATIC_ASSERT(offsetof(UVM_KVC_ALLOC_PARAMS, pageSize) == 24, "ALLOC.pageSize");
UVM_KVC_STATIC_ASSERT(offsetof(UVM_KVC_ALLOC_PARAMS, rmStatus) == 64, "ALLOC.rmStatus");
UVM_KVC_STATIC_ASSERT(sizeof(UVM_KVC_FREE_PARAMS) == 48, "UVM_KVC_FREE_PARAMS size");
UVM_KVC_STATIC_ASSERT(offsetof(UVM_KVC_FREE_PARAMS, count) == 8, "FREE.count");
UVM_KVC_STATIC_ASSERT(offsetof(UVM_KVC_FREE_PARAMS, rmStatus) == 40, "FREE.rmStatus");
UVM_KVC_STATIC_ASSERT(sizeof(UVM_KVC_CREATE_RANGE_PARAMS) == 40, "UVM_KVC_CREATE_RANGE_PARAMS size");
UVM_KVC_STATIC_ASSERT(offsetof(UVM_KVC_CREATE_RANGE_PARAMS, rmStatus) == 32, "CREATE_RANGE.rmStatus");
UVM_KVC_STATIC_ASSERT(sizeof(UVM_KVC_MAP_PARAMS) == 72, "UVM_KVC_MAP_PARAMS size");
UVM_KVC_STATIC_ASSERT(offsetof(UVM_KVC_MAP_PARAMS, base) == 24, "MAP.base");
UVM_KVC_STATIC_ASSERT(offsetof(UVM_KVC_MAP_PARAMS, rmStatus) == 64, "MAP.rmStatus");
UVM_KVC_STATIC_ASSERT(sizeof(UVM_KVC_SCATTER_ENTRY) == 16, "UVM_KVC_SCATTER_ENTRY size");
UVM_KVC_STATIC_ASSERT(sizeof(UVM_KVC_MAP_SCATTER_PARAMS) == 64, "UVM_KVC_MAP_SCATTER_PARAMS size");
UVM_KVC_STATIC_ASSERT(offsetof(UVM_KVC_MAP_SCATTER_PARAMS, rmStatus) == 56, "MAP_SCATTER.rmStatus");
UVM_KVC_STATIC_ASSERT(sizeof(UVM_KVC_UNMAP_PARAMS) == 56, "UVM_KVC_UNMAP_PARAMS size");
UVM_KVC_STATIC_ASSERT(offsetof(UVM_KVC_UNMAP_PARAMS, rmStatus) == 48, "UNMAP.rmStatus");
UVM_KVC_STATIC_ASSERT(sizeof(UVM_KVC_TEST_SANITY_PARAMS) == 64, "UVM_KVC_TEST_SANITY_PARAMS size");
UVM_KVC_STATIC_ASSERT(offsetof(UVM_KVC_TEST_SANITY_PARAMS, iterations) == 40, "TEST_SANITY.iterations");
UVM_KVC_STATIC_ASSERT(offsetof(UVM_KVC_TEST_SANITY_PARAMS, rmStatus) == 56, "TEST_SANITY.rmStatus");
UVM_KVC_STATIC_ASSERT(UVM_KVC_IOCTL_BASE(0) == 1536 && UVM_KVC_IOCTL_BASE(15) <= 2047, "ioctl numbers");

#endif /* UVM_KVC_IOCTL_H */

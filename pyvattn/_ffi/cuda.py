"""The CUDA driver API subset the cuda-vmm backend needs, through cffi ABI mode.

No compiler, no CUDA toolkit, no libtorch at install time: ``libcuda.so.1`` (shipped with the
driver) is opened lazily, on the first call to :func:`lib`. A missing library becomes
:class:`~pyvattn.errors.BackendUnavailable`; a ``CUresult`` other than ``CUDA_SUCCESS`` becomes
:class:`~pyvattn.errors.CudaError` carrying the status name.

Declarations follow ``cuda.h`` (CUDA 12.x, LP64). Where ``cuda.h`` ``#define``s a name to a
versioned symbol, the versioned symbol is declared (``cuMemGetInfo_v2``,
``cuDevicePrimaryCtxRelease_v2``): those are what a program built against the header calls. Enums
are declared as plain ints, with the values the code uses written out below.
"""

from __future__ import annotations

import contextlib
import threading

from cffi import FFI

from ..errors import BackendUnavailable, CudaError

ffi = FFI()
ffi.cdef(
    """
    typedef int CUresult;
    typedef int CUdevice;
    typedef unsigned long long CUdeviceptr;                   /* CUdeviceptr_v2 on LP64 */
    typedef unsigned long long CUmemGenericAllocationHandle;
    typedef struct CUctx_st *CUcontext;
    typedef struct { char bytes[16]; } CUuuid;

    typedef struct {
        int type;                                             /* CUmemLocationType */
        int id;
    } CUmemLocation;

    typedef struct {
        int type;                                             /* CUmemAllocationType */
        int requestedHandleTypes;                             /* CUmemAllocationHandleType */
        CUmemLocation location;
        void *win32HandleMetaData;
        struct {
            unsigned char compressionType;
            unsigned char gpuDirectRDMACapable;
            unsigned short usage;
            unsigned char reserved[4];
        } allocFlags;
    } CUmemAllocationProp;

    typedef struct {
        CUmemLocation location;
        int flags;                                            /* CUmemAccess_flags */
    } CUmemAccessDesc;

    CUresult cuInit(unsigned int flags);
    CUresult cuDriverGetVersion(int *version);
    CUresult cuGetErrorName(CUresult error, const char **name);
    CUresult cuGetErrorString(CUresult error, const char **str);

    CUresult cuDeviceGet(CUdevice *device, int ordinal);
    CUresult cuDeviceGetCount(int *count);
    CUresult cuDeviceGetName(char *name, int len, CUdevice dev);
    CUresult cuDeviceGetUuid(CUuuid *uuid, CUdevice dev);
    CUresult cuDeviceGetUuid_v2(CUuuid *uuid, CUdevice dev);
    CUresult cuDeviceGetAttribute(int *value, int attrib, CUdevice dev);
    CUresult cuDeviceTotalMem_v2(size_t *bytes, CUdevice dev);

    CUresult cuDevicePrimaryCtxRetain(CUcontext *ctx, CUdevice dev);
    CUresult cuDevicePrimaryCtxRelease_v2(CUdevice dev);
    CUresult cuCtxGetCurrent(CUcontext *ctx);
    CUresult cuCtxSetCurrent(CUcontext ctx);
    CUresult cuCtxSynchronize(void);

    CUresult cuMemGetInfo_v2(size_t *free, size_t *total);
    CUresult cuMemGetAllocationGranularity(size_t *granularity, const CUmemAllocationProp *prop,
                                           int option);
    CUresult cuMemAddressReserve(CUdeviceptr *ptr, size_t size, size_t alignment, CUdeviceptr addr,
                                 unsigned long long flags);
    CUresult cuMemAddressFree(CUdeviceptr ptr, size_t size);
    CUresult cuMemCreate(CUmemGenericAllocationHandle *handle, size_t size,
                         const CUmemAllocationProp *prop, unsigned long long flags);
    CUresult cuMemRelease(CUmemGenericAllocationHandle handle);
    CUresult cuMemMap(CUdeviceptr ptr, size_t size, size_t offset, CUmemGenericAllocationHandle handle,
                      unsigned long long flags);
    CUresult cuMemUnmap(CUdeviceptr ptr, size_t size);
    CUresult cuMemSetAccess(CUdeviceptr ptr, size_t size, const CUmemAccessDesc *desc, size_t count);
    CUresult cuMemGetAccess(unsigned long long *flags, const CUmemLocation *location, CUdeviceptr ptr);
    """
)

CUDA_SUCCESS = 0
CUDA_ERROR_OUT_OF_MEMORY = 2
CUDA_ERROR_DEINITIALIZED = 4
CU_MEM_ALLOCATION_TYPE_PINNED = 0x1
CU_MEM_HANDLE_TYPE_NONE = 0x0
CU_MEM_LOCATION_TYPE_DEVICE = 0x1
CU_MEM_ACCESS_FLAGS_PROT_READWRITE = 0x3
CU_MEM_ALLOC_GRANULARITY_MINIMUM = 0x0
CU_MEM_ALLOC_GRANULARITY_RECOMMENDED = 0x1
CU_DEVICE_ATTRIBUTE_VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED = 102

#: Names of the CUresults this project can meet, for drivers without cuGetErrorName (< 6.0) and
#: for codes it does not know.
ERROR_NAMES = {
    0: "CUDA_SUCCESS",
    1: "CUDA_ERROR_INVALID_VALUE",
    2: "CUDA_ERROR_OUT_OF_MEMORY",
    3: "CUDA_ERROR_NOT_INITIALIZED",
    4: "CUDA_ERROR_DEINITIALIZED",
    34: "CUDA_ERROR_STUB_LIBRARY",
    46: "CUDA_ERROR_DEVICE_UNAVAILABLE",
    100: "CUDA_ERROR_NO_DEVICE",
    101: "CUDA_ERROR_INVALID_DEVICE",
    102: "CUDA_ERROR_DEVICE_NOT_LICENSED",
    201: "CUDA_ERROR_INVALID_CONTEXT",
    205: "CUDA_ERROR_MAP_FAILED",
    206: "CUDA_ERROR_UNMAP_FAILED",
    208: "CUDA_ERROR_ALREADY_MAPPED",
    211: "CUDA_ERROR_NOT_MAPPED",
    400: "CUDA_ERROR_INVALID_HANDLE",
    401: "CUDA_ERROR_ILLEGAL_STATE",
    500: "CUDA_ERROR_NOT_FOUND",
    600: "CUDA_ERROR_NOT_READY",
    700: "CUDA_ERROR_ILLEGAL_ADDRESS",
    719: "CUDA_ERROR_LAUNCH_FAILED",
    800: "CUDA_ERROR_NOT_PERMITTED",
    801: "CUDA_ERROR_NOT_SUPPORTED",
    802: "CUDA_ERROR_SYSTEM_NOT_READY",
    803: "CUDA_ERROR_SYSTEM_DRIVER_MISMATCH",
    804: "CUDA_ERROR_COMPAT_NOT_SUPPORTED_ON_DEVICE",
    999: "CUDA_ERROR_UNKNOWN",
}

LIBRARY_NAMES = ("libcuda.so.1", "libcuda.so")

_lib = None
_lib_path: str | None = None  # set by use_library
_init_status: int | None = None
_lock = threading.Lock()


def open_library(names=LIBRARY_NAMES):
    """dlopen the first of ``names`` that loads; ``BackendUnavailable`` listing why each failed."""
    errors = []
    for name in names:
        try:
            return ffi.dlopen(name)
        except OSError as exc:
            errors.append(str(exc).split("  Additionally")[0].split(": ", 1)[-1].rstrip("."))
    raise BackendUnavailable("cannot load the CUDA driver library (is the NVIDIA driver installed?): "
                             + "; ".join(errors))


def use_library(path: str) -> None:
    """Take the driver API from the library at ``path`` instead of ``libcuda.so.1``: a driver
    library outside the loader's search path, or a stand-in (the benchmarks' CPU checks). Call it
    before anything else uses the driver; asking for another library once one is loaded raises
    ``RuntimeError`` (live handles and contexts belong to the first)."""
    global _lib, _lib_path, _init_status
    with _lock:
        if _lib is not None:
            if _lib_path == str(path):
                return
            raise RuntimeError(f"the CUDA driver library is already loaded; cannot switch to {path}")
        try:
            _lib = ffi.dlopen(str(path))
        except OSError as exc:
            raise BackendUnavailable(f"cannot load the CUDA driver library {path}: {exc}") from None
        _lib_path, _init_status = str(path), None


def lib():
    """The loaded driver library (opened on first use, then cached)."""
    global _lib
    if _lib is None:
        with _lock:
            if _lib is None:
                _lib = open_library()
    return _lib


def error_name(status: int) -> str:
    """``CUDA_ERROR_...`` name of ``status``: from the driver when it can tell, else the table."""
    if _lib is not None:
        name = ffi.new("const char **")
        try:
            if _lib.cuGetErrorName(status, name) == CUDA_SUCCESS and name[0] != ffi.NULL:
                return ffi.string(name[0]).decode()
        except AttributeError:  # symbol missing from a very old driver
            pass
    return ERROR_NAMES.get(status, f"CUDA_ERROR_{status}")


def error_string(status: int) -> str:
    if _lib is not None:
        text = ffi.new("const char **")
        try:
            if _lib.cuGetErrorString(status, text) == CUDA_SUCCESS and text[0] != ffi.NULL:
                return ffi.string(text[0]).decode()
        except AttributeError:
            pass
    return ""


def check(call: str, status: int) -> None:
    """Raise ``CudaError(call, name, status)`` unless ``status`` is ``CUDA_SUCCESS``."""
    if status != CUDA_SUCCESS:
        raise CudaError(call, error_name(status), status, error_string(status))


def init() -> None:
    """``cuInit(0)`` once per process (the driver's answer is remembered, failure included)."""
    global _init_status
    if _init_status is None:
        driver = lib()
        with _lock:
            if _init_status is None:
                _init_status = driver.cuInit(0)
    check("cuInit", _init_status)


# --- small typed wrappers (not used on the hot path, where the backend calls lib() directly) ----
def driver_version() -> int:
    """The driver's CUDA version as an int (12040 means 12.4)."""
    out = ffi.new("int *")
    check("cuDriverGetVersion", lib().cuDriverGetVersion(out))
    return out[0]


def device_count() -> int:
    init()
    out = ffi.new("int *")
    check("cuDeviceGetCount", lib().cuDeviceGetCount(out))
    return out[0]


def device_get(ordinal: int) -> int:
    init()
    out = ffi.new("CUdevice *")
    check("cuDeviceGet", lib().cuDeviceGet(out, ordinal))
    return out[0]


def device_name(dev: int) -> str:
    buf = ffi.new("char[256]")
    check("cuDeviceGetName", lib().cuDeviceGetName(buf, 256, dev))
    return ffi.string(buf).decode(errors="replace")


def device_uuid(dev: int) -> str:
    out = ffi.new("CUuuid *")
    try:
        check("cuDeviceGetUuid_v2", lib().cuDeviceGetUuid_v2(out, dev))
    except AttributeError:
        check("cuDeviceGetUuid", lib().cuDeviceGetUuid(out, dev))
    h = bytes(ffi.buffer(out.bytes)).hex()
    return f"GPU-{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def device_attribute(attrib: int, dev: int) -> int:
    out = ffi.new("int *")
    check("cuDeviceGetAttribute", lib().cuDeviceGetAttribute(out, attrib, dev))
    return out[0]


def mem_get_info() -> tuple[int, int]:
    """(free, total) bytes of the device of the current context."""
    free, total = ffi.new("size_t *"), ffi.new("size_t *")
    check("cuMemGetInfo_v2", lib().cuMemGetInfo_v2(free, total))
    return free[0], total[0]


def allocation_prop(dev: int):
    """A ``CUmemAllocationProp *`` for pinned memory on device ``dev`` (no export handles)."""
    prop = ffi.new("CUmemAllocationProp *")  # zeroed: allocFlags all 0
    prop.type = CU_MEM_ALLOCATION_TYPE_PINNED
    prop.requestedHandleTypes = CU_MEM_HANDLE_TYPE_NONE
    prop.location.type = CU_MEM_LOCATION_TYPE_DEVICE
    prop.location.id = dev
    return prop


def access_desc(dev: int):
    """A ``CUmemAccessDesc *`` granting device ``dev`` read/write access."""
    desc = ffi.new("CUmemAccessDesc *")
    desc.location.type = CU_MEM_LOCATION_TYPE_DEVICE
    desc.location.id = dev
    desc.flags = CU_MEM_ACCESS_FLAGS_PROT_READWRITE
    return desc


def allocation_granularity(dev: int, option: int = CU_MEM_ALLOC_GRANULARITY_MINIMUM) -> int:
    out = ffi.new("size_t *")
    check("cuMemGetAllocationGranularity",
          lib().cuMemGetAllocationGranularity(out, allocation_prop(dev), option))
    return out[0]


class PrimaryContext:
    """A reference to a device's primary context (the one torch uses), made current around
    driver calls from any thread: a background mapping thread has no current context.

    ``current()`` makes it current if another (or none) is, and restores the previous one after.
    ``release()`` drops the reference once; later calls do nothing.
    """

    def __init__(self, ordinal: int):
        self.dev = device_get(ordinal)
        out = ffi.new("CUcontext *")
        check("cuDevicePrimaryCtxRetain", lib().cuDevicePrimaryCtxRetain(out, self.dev))
        self.ctx = out[0]
        self._released = False

    @contextlib.contextmanager
    def current(self):
        """Yield the driver library with this context current on the calling thread."""
        driver = lib()
        cur = ffi.new("CUcontext *")
        check("cuCtxGetCurrent", driver.cuCtxGetCurrent(cur))
        prev = cur[0]
        if prev != self.ctx:
            check("cuCtxSetCurrent", driver.cuCtxSetCurrent(self.ctx))
        try:
            yield driver
        finally:
            if prev != self.ctx and prev != ffi.NULL:
                driver.cuCtxSetCurrent(prev)

    def synchronize(self) -> None:
        """Wait for all work in the context (every torch stream on the device included)."""
        with self.current() as driver:
            check("cuCtxSynchronize", driver.cuCtxSynchronize())

    def mem_info(self) -> tuple[int, int]:
        """(free, total) device memory in bytes, as the driver reports it."""
        with self.current():
            return mem_get_info()

    def release(self) -> int:
        """Drop the reference (once); return the driver's status."""
        if self._released:
            return CUDA_SUCCESS
        self._released = True
        return lib().cuDevicePrimaryCtxRelease_v2(self.dev)

"""The CUDA driver declarations and the DLPack view helper, checked without a GPU."""

from __future__ import annotations

import ctypes
import gc
import platform

import numpy as np
import pytest
import torch

from pyvattn import BackendUnavailable
from pyvattn._ffi import cuda
from pyvattn._ffi.dlpack import device_tensor
from pyvattn.errors import CudaError, DriverError

LP64 = ctypes.sizeof(ctypes.c_void_p) == 8 and platform.system() == "Linux"


def _libcuda_loads() -> bool:
    try:
        cuda.open_library()
    except BackendUnavailable:
        return False
    return True


@pytest.mark.skipif(not LP64, reason="layouts below are cuda.h's on 64-bit Linux")
def test_struct_layouts_match_cuda_h():
    ffi = cuda.ffi
    # CUmemLocation { CUmemLocationType type; int id; }
    assert ffi.sizeof("CUmemLocation") == 8
    assert ffi.offsetof("CUmemLocation", "id") == 4
    # CUmemAllocationProp { type; requestedHandleTypes; location; void *win32HandleMetaData;
    #                       struct { uchar compressionType, gpuDirectRDMACapable; ushort usage;
    #                                uchar reserved[4]; } allocFlags; }
    assert ffi.sizeof("CUmemAllocationProp") == 32
    assert ffi.alignof("CUmemAllocationProp") == 8
    for field, offset in [("type", 0), ("requestedHandleTypes", 4), ("location", 8),
                          ("win32HandleMetaData", 16), ("allocFlags", 24)]:
        assert ffi.offsetof("CUmemAllocationProp", field) == offset, field
    prop = ffi.new("CUmemAllocationProp *")
    assert ffi.sizeof(prop.allocFlags) == 8
    # CUmemAccessDesc { CUmemLocation location; CUmemAccess_flags flags; }
    assert ffi.sizeof("CUmemAccessDesc") == 12
    assert ffi.offsetof("CUmemAccessDesc", "flags") == 8
    assert ffi.sizeof("CUuuid") == 16
    assert ffi.sizeof("CUdeviceptr") == ffi.sizeof("CUmemGenericAllocationHandle") == 8


def test_alloc_flags_subfields_sit_where_the_driver_reads_them():
    prop = cuda.allocation_prop(3)
    prop.allocFlags.usage = 0xBEEF
    prop.allocFlags.gpuDirectRDMACapable = 1
    raw = bytes(cuda.ffi.buffer(prop))
    assert raw[0:4] == (1).to_bytes(4, "little")  # CU_MEM_ALLOCATION_TYPE_PINNED
    assert raw[4:8] == bytes(4)  # no shareable handle types requested
    assert raw[8:16] == (1).to_bytes(4, "little") + (3).to_bytes(4, "little")  # device 3
    assert raw[24:32] == bytes([0, 1]) + (0xBEEF).to_bytes(2, "little") + bytes(4)


def test_access_desc_grants_read_write_on_the_device():
    desc = cuda.access_desc(1)
    assert (desc.location.type, desc.location.id, desc.flags) == (1, 1, 3)


def test_every_needed_function_is_declared():
    # Resolve each name against a library that lacks it: a declared name fails with "not found in
    # library", an undeclared one with "no function ... named".
    libc = cuda.ffi.dlopen(None)
    names = ["cuInit", "cuDriverGetVersion", "cuDeviceGet", "cuDeviceGetCount", "cuDeviceGetName",
             "cuDeviceGetUuid", "cuDeviceGetUuid_v2", "cuDeviceGetAttribute", "cuDeviceTotalMem_v2",
             "cuDevicePrimaryCtxRetain", "cuDevicePrimaryCtxRelease_v2", "cuCtxGetCurrent",
             "cuCtxSetCurrent", "cuCtxSynchronize", "cuMemGetAllocationGranularity",
             "cuMemAddressReserve", "cuMemAddressFree", "cuMemCreate", "cuMemRelease", "cuMemMap",
             "cuMemUnmap", "cuMemSetAccess", "cuMemGetInfo_v2", "cuGetErrorName", "cuGetErrorString"]
    for name in names:
        with pytest.raises(AttributeError, match="not found in library"):
            getattr(libc, name)
    with pytest.raises(AttributeError) as info:
        libc.cuMemGetInfo  # the unversioned name is not what cuda.h programs call
    assert "not found in library" not in str(info.value)


def test_error_names_from_the_builtin_table():
    assert cuda.ERROR_NAMES[2] == "CUDA_ERROR_OUT_OF_MEMORY"
    if not _libcuda_loads():
        assert cuda.error_name(2) == "CUDA_ERROR_OUT_OF_MEMORY"
        assert cuda.error_name(801) == "CUDA_ERROR_NOT_SUPPORTED"
    assert cuda.error_name(123456).startswith("CUDA_ERROR_")


def test_check_raises_cuda_error_with_the_status_name():
    cuda.check("cuMemCreate", cuda.CUDA_SUCCESS)  # no error
    with pytest.raises(CudaError) as info:
        cuda.check("cuMemCreate", 2)
    err = info.value
    assert isinstance(err, DriverError)
    assert (err.call, err.status, err.code) == ("cuMemCreate", "CUDA_ERROR_OUT_OF_MEMORY", 2)
    assert "cuMemCreate failed: CUDA_ERROR_OUT_OF_MEMORY (2)" in str(err)


def test_missing_library_is_backend_unavailable():
    with pytest.raises(BackendUnavailable, match="libcuda-does-not-exist"):
        cuda.open_library(["libcuda-does-not-exist.so.1"])


@pytest.mark.skipif(_libcuda_loads(), reason="libcuda is installed here")
def test_lazy_load_without_libcuda():
    with pytest.raises(BackendUnavailable, match="NVIDIA driver"):
        cuda.lib()
    with pytest.raises(BackendUnavailable):
        cuda.init()
    from pyvattn.backends.cuda_vmm import CudaVmmBackend

    probe = CudaVmmBackend.probe(torch.device("cuda"))
    assert not probe.available and "libcuda" in probe.reason
    assert not CudaVmmBackend.probe(torch.device("cpu")).available


# --- DLPack views (the same code path as kDLCUDA, on CPU memory) ----------------------------------
def test_device_tensor_is_a_zero_copy_view():
    buf = np.zeros(4096, dtype=np.uint8)
    t = device_tensor(buf.ctypes.data, buf.nbytes, torch.device("cpu"))
    assert t.dtype == torch.uint8 and t.shape == (4096,) and t.device.type == "cpu"
    assert t.data_ptr() == buf.ctypes.data
    # write through the tensor (any dtype), read through numpy
    t.view(torch.float16)[10:20] = torch.arange(10, dtype=torch.float16)
    assert np.array_equal(buf.view(np.float16)[10:20], np.arange(10, dtype=np.float16))
    t[:8].view(torch.float64)[0] = 2.5
    assert buf[:8].view(np.float64)[0] == 2.5
    # write through numpy, read through the tensor
    buf[4000:4004] = [1, 2, 3, 4]
    assert t[4000:4004].tolist() == [1, 2, 3, 4]


def test_device_tensor_views_outlive_the_first_tensor():
    buf = np.arange(256, dtype=np.uint8)
    t = device_tensor(buf.ctypes.data, 256, torch.device("cpu"))
    view = t[100:110].clone(), t[200:]
    del t
    gc.collect()
    assert view[1][:3].tolist() == [200, 201, 202]
    assert view[0].tolist() == list(range(100, 110))


def test_device_tensor_rejects_bad_arguments():
    with pytest.raises(ValueError, match="ptr"):
        device_tensor(0, 16, torch.device("cpu"))
    with pytest.raises(ValueError, match="nbytes"):
        device_tensor(0x1000, 0, torch.device("cpu"))
    with pytest.raises(ValueError, match="device"):
        device_tensor(0x1000, 16, torch.device("meta"))


def test_device_tensor_headers_are_freed_by_torch():
    import resource

    buf = np.zeros(64, dtype=np.uint8)
    for _ in range(20000):
        device_tensor(buf.ctypes.data, 64, torch.device("cpu"))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for _ in range(50000):
        device_tensor(buf.ctypes.data, 64, torch.device("cpu"))
    grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    assert grown_kib < 2048  # a leaked ~100-byte header each would be ~5 MiB

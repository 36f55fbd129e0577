"""Zero-copy torch tensors over raw addresses, through a hand-built DLPack capsule.

``device_tensor(ptr, nbytes, device)`` hands torch a legacy ``DLManagedTensor`` ("dltensor"
capsule) describing ``nbytes`` of ``uint8`` at ``ptr``. torch builds the tensor with
``from_blob`` on the device named in the capsule: it makes no CUDA pointer-attribute query, so the
address may be a reserved-but-unmapped VA range (cuda-vmm) or memory CUDA does not know about at
all (uvm64k). Compare ``__cuda_array_interface__``: torch asks the driver which device owns the
pointer (``cudaPointerGetAttributes``), which fails or lies for such ranges.

Ownership: the tensor does **not** own the memory. The caller keeps the range alive (reserved, and
mapped wherever it is touched) for as long as any view of it exists. The capsule's bookkeeping
(the struct plus its shape/strides) is one ``malloc`` block whose deleter is libc ``free``, so
torch frees it when the last view dies, without calling back into Python (safe on any thread and
at interpreter exit).

Streams: a raw capsule carries no stream. The memory is usable by work on any stream once the
backend's ``map`` has returned (mappings are established synchronously on the host); ordering of
reads and writes between streams is the user's business, as for any torch tensor.
"""

from __future__ import annotations

import ctypes

import torch
from cffi import FFI

ffi = FFI()
ffi.cdef(
    """
    typedef struct { int32_t device_type; int32_t device_id; } DLDevice;
    typedef struct { uint8_t code; uint8_t bits; uint16_t lanes; } DLDataType;
    typedef struct {
        void *data;
        DLDevice device;
        int32_t ndim;
        DLDataType dtype;
        int64_t *shape;
        int64_t *strides;
        uint64_t byte_offset;
    } DLTensor;
    typedef struct DLManagedTensor {
        DLTensor dl_tensor;
        void *manager_ctx;
        void (*deleter)(struct DLManagedTensor *self);
    } DLManagedTensor;
    /* the capsule's bookkeeping, in one block that libc free() releases */
    typedef struct { DLManagedTensor managed; int64_t shape[1]; int64_t strides[1]; } Block;
    void *malloc(size_t size);
    void free(void *ptr);
    """
)
_libc = ffi.dlopen(None)
_FREE = ffi.cast("void (*)(DLManagedTensor *)", _libc.free)

kDLCPU, kDLCUDA = 1, 2
kDLUInt = 1
_DEVICE_TYPES = {"cpu": kDLCPU, "cuda": kDLCUDA}

_CAPSULE_NAME = b"dltensor"
_USED_NAME = b"used_dltensor"
_PyCapsule_New = ctypes.pythonapi.PyCapsule_New
_PyCapsule_New.restype = ctypes.py_object
_PyCapsule_New.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p]
_PyCapsule_IsValid = ctypes.pythonapi.PyCapsule_IsValid
_PyCapsule_IsValid.restype = ctypes.c_int
_PyCapsule_IsValid.argtypes = [ctypes.py_object, ctypes.c_char_p]
_PyCapsule_SetName = ctypes.pythonapi.PyCapsule_SetName
_PyCapsule_SetName.restype = ctypes.c_int
_PyCapsule_SetName.argtypes = [ctypes.py_object, ctypes.c_char_p]


def _dl_device(device: torch.device) -> tuple[int, int]:
    device = torch.device(device)
    if device.type not in _DEVICE_TYPES:
        raise ValueError(f"device={device} is not supported (cpu or cuda)")
    index = device.index
    if device.type == "cuda" and index is None:
        index = torch.cuda.current_device()
    return _DEVICE_TYPES[device.type], index or 0


def device_tensor(ptr: int, nbytes: int, device: torch.device) -> torch.Tensor:
    """A 1-D ``uint8`` tensor of ``nbytes`` at address ``ptr`` on ``device`` (cpu or cuda[:N]).

    Zero-copy and not owning: see the module docstring for lifetime and stream rules. Reshape it
    to any dtype with ``.view(dtype)`` / ``.as_strided``.
    """
    if ptr <= 0:
        raise ValueError(f"ptr={ptr:#x} must be a non-null address")
    if nbytes <= 0:
        raise ValueError(f"nbytes={nbytes} must be positive")
    dev_type, dev_id = _dl_device(device)
    raw = _libc.malloc(ffi.sizeof("Block"))
    if raw == ffi.NULL:
        raise MemoryError("malloc failed for a DLPack header")
    block = ffi.cast("Block *", raw)
    block.shape[0] = nbytes
    block.strides[0] = 1
    t = block.managed.dl_tensor
    t.data = ffi.cast("void *", ptr)
    t.device.device_type = dev_type
    t.device.device_id = dev_id
    t.ndim = 1
    t.dtype.code, t.dtype.bits, t.dtype.lanes = kDLUInt, 8, 1
    t.shape = block.shape
    t.strides = block.strides
    t.byte_offset = 0
    block.managed.manager_ctx = ffi.NULL
    block.managed.deleter = _FREE
    capsule = _PyCapsule_New(int(ffi.cast("uintptr_t", raw)), _CAPSULE_NAME, None)
    try:
        return torch.utils.dlpack.from_dlpack(capsule)
    finally:
        # torch renames a capsule it consumed; one it did not consume is still ours to free.
        if _PyCapsule_IsValid(capsule, _CAPSULE_NAME):
            _PyCapsule_SetName(capsule, _USED_NAME)
            _libc.free(raw)

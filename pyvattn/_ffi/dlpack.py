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

``watched(tensor)`` re-exports a tensor's memory with a deleter that *tells* when the last view
died, still without Python: once torch has read the capsule (it copies the shape, strides and data
pointer into its own tensor), the block's first bytes become a POSIX semaphore and the deleter is
libc ``sem_post``, which is async-signal-safe and touches nothing but the block. ``Watch.alive()``
reads the semaphore; the block is freed once it has been seen posted.

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
    /* glibc's sem_t is 32 bytes on every 64-bit target (__SIZEOF_SEM_T) */
    int sem_init(void *sem, int pshared, unsigned int value);
    int sem_post(void *sem);
    int sem_getvalue(void *sem, int *sval);
    int sem_destroy(void *sem);
    """
)
_libc = ffi.dlopen(None)
_FREE = ffi.cast("void (*)(DLManagedTensor *)", _libc.free)
_SEM_POST = ffi.cast("void (*)(DLManagedTensor *)", _libc.sem_post)
_SEM_T_SIZE = 32
assert ffi.sizeof("Block") >= _SEM_T_SIZE

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
    return _import(ptr, nbytes, device)[0]


class Watch:
    """Whether any view of a :func:`watched` tensor is still alive (polled, no callback)."""

    def __init__(self, block):
        self._block = block  # None once seen dead and freed

    def alive(self) -> bool:
        if self._block is None:
            return False
        value = ffi.new("int *")
        _libc.sem_getvalue(self._block, value)
        if value[0] == 0:
            return True
        _libc.sem_destroy(self._block)
        _libc.free(self._block)
        self._block = None
        return False


def watched(tensor: torch.Tensor) -> tuple[torch.Tensor, Watch]:
    """The same memory as the 1-D ``uint8`` ``tensor`` (which must not own it), as a new tensor
    whose lifetime, and that of every view of it, ``Watch.alive()`` reports."""
    if tensor.dim() != 1 or tensor.dtype != torch.uint8:
        raise ValueError(f"tensor must be 1-D uint8, got {tuple(tensor.shape)} {tensor.dtype}")
    out, block = _import(tensor.data_ptr(), tensor.numel(), tensor.device)
    # torch has copied what it needs out of the capsule: the block now serves as the semaphore
    # its deleter posts when the last view dies.
    _libc.sem_init(block, 0, 0)
    ffi.cast("Block *", block).managed.deleter = _SEM_POST
    return out, Watch(block)


def _import(ptr: int, nbytes: int, device: torch.device):
    """(tensor, its capsule block) for ``nbytes`` at ``ptr``; the block is freed by torch."""
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
        return torch.utils.dlpack.from_dlpack(capsule), raw
    finally:
        # torch renames a capsule it consumed; one it did not consume is still ours to free.
        if _PyCapsule_IsValid(capsule, _CAPSULE_NAME):
            _PyCapsule_SetName(capsule, _USED_NAME)
            _libc.free(raw)

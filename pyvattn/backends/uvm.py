"""uvm64k backend: 64 KiB GPU pages from the pyvattn-patched nvidia-uvm module.

The patch (driver-patch/, described in docs/driver.md) adds ioctls on
``/dev/nvidia-uvm``; this backend speaks them through :mod:`pyvattn._ffi.uvm`:

* It uses **CUDA's own** UVM file descriptor: mappings must land in the GPU VA space CUDA
  registered, so the backend finds that fd in ``/proc/self/fd`` by asking each ``/dev/nvidia-uvm``
  descriptor ``UVM_KVC_QUERY`` and keeping the va_space fd that has the GPU's VA space (never the
  secondary "mm" fd). The fd is CUDA's: the backend never closes it.
* A reservation is ``mmap(PROT_NONE, MAP_NORESERVE)`` trimmed to 2 MiB alignment (what
  ``UvmReserveVa`` does) and rounded up to whole 2 MiB (the module keeps the page tables of its
  ranges in 2 MiB blocks), made a KVC-owned UVM external range with ``UVM_KVC_CREATE_RANGE``.
  Giving it back is the stock ``UVM_FREE`` of the range, *then* ``munmap`` (the other
  order lets CUDA reuse the VA while UVM still holds the range).
* A physical page is one ``UVM_KVC_ALLOC`` handle of ``page_size`` (64, 128 or 256 KiB; the
  module maps the bigger ones as consecutive 64K PTEs, there being no 128K/256K PTE). Where a
  module reports only 64K in ``supportedPageSizes``, a bigger page is 2 or 4 64K handles mapped
  at consecutive VAs.
  Handles are opaque per-fd ids: the memory is pinned, zeroed on first use, and returned when the
  process closes the fd, even after a crash.
* ``map`` is ``UVM_KVC_MAP`` per VA-contiguous run, or ``UVM_KVC_MAP_SCATTER`` when the pages are
  scattered, whichever takes fewer ioctls (batches of at most ``maxBatch`` pages). Maps are
  synchronous: the PTEs are live when the ioctl returns.
* ``unmap`` synchronizes the device, then ``UVM_KVC_UNMAP`` per contiguous run.
* Fork: CUDA's fd is inherited by a child, but the module serves only the process that owns
  it. A backend never issues an ioctl from another process: in a forked child ``close()`` only
  forgets its books (the parent's pages and ranges stay the parent's), and every other method
  raises (backends/base.py does this for every backend). ``EAGAIN`` (the driver's answer while
  the system suspends) is retried by the ABI layer.

The VAs are unknown to CUDA: tensors over them are built through DLPack (no pointer query),
``cudaMemcpy(..., cudaMemcpyDefault)`` on them would treat them as host pointers, and a GPU access
to an unmapped page is a fatal MMU fault (CUDA error 700), not a zero read.
"""

from __future__ import annotations

import os
from collections import Counter

import numpy as np
import torch

from .._ffi import cuda, libc
from .._ffi.dlpack import device_tensor
from ..errors import BackendUnavailable, CudaError, OSCallError, UvmError
from .base import Backend, KiB, MiB, Probe, Runs, Undo, runs, undo_one

GRANULE = 64 * KiB  # the module's smallest page and the granularity of every address
PAGE_SIZES = (64 * KiB, 128 * KiB, 256 * KiB)
_RESERVE_ALIGN = 2 * MiB
_OOM = ("NV_ERR_NO_MEMORY", "NV_ERR_INSUFFICIENT_RESOURCES")
UVM_DEVICE = "/dev/nvidia-uvm"


def _abi():
    """The ioctl ABI module; imported lazily so that ``import pyvattn`` never parses the header."""
    from .._ffi import uvm

    return uvm


def _ordinal(device: torch.device) -> int:
    device = torch.device(device)
    if device.index is not None:
        return device.index
    return torch.cuda.current_device() if torch.cuda.is_initialized() else 0


def gpu_uuid(ordinal: int) -> bytes:
    """The 16-byte UUID of CUDA device ``ordinal`` (what CUDA registered with UVM)."""
    text = cuda.device_uuid(cuda.device_get(ordinal))  # "GPU-xxxxxxxx-xxxx-..."
    return bytes.fromhex(text[4:].replace("-", ""))


def uvm_fds() -> list[int]:
    """This process's open file descriptors on ``/dev/nvidia-uvm``, in fd order."""
    fds = []
    try:
        names = os.listdir("/proc/self/fd")
    except OSError:
        return fds
    for name in names:
        try:
            if os.readlink(f"/proc/self/fd/{name}") == UVM_DEVICE:
                fds.append(int(name))
        except OSError:
            continue  # closed meanwhile (the listdir fd itself, among others)
    return sorted(fds)


def query(fd: int, uuid: bytes = bytes(16)):
    """``UVM_KVC_QUERY`` on ``fd`` (for ``uuid``, or no GPU); returns the params struct.

    Raises ``OSCallError`` on a stock driver (EINVAL / ENOSYS), ``UvmError`` on an ABI mismatch
    (NV_ERR_NOT_SUPPORTED), and ``BackendUnavailable`` when the answer's magic is not ours.
    """
    uvm = _abi()
    p = uvm.ioctl(fd, uvm.UVM_KVC_QUERY, uvm.params("UVM_KVC_QUERY", gpuUuid=uuid))
    if p.magic != uvm.UVM_KVC_MAGIC:
        raise BackendUnavailable(f"fd {fd}: UVM_KVC_QUERY answered with magic {p.magic:#x}, "
                                 f"not {uvm.UVM_KVC_MAGIC:#x}: not the pyvattn nvidia-uvm patch")
    return p


def module_version(path: str = "/sys/module/nvidia_uvm/version") -> str | None:
    """The loaded nvidia-uvm's version string (the patch marks its build), if sysfs shows it."""
    try:
        with open(path) as f:
            return f.read().strip() or None
    except OSError:
        return None


def _why_not(exc: Exception) -> str:
    """A user-facing reason for a failed QUERY."""
    if isinstance(exc, OSCallError) and exc.status in ("EINVAL", "ENOSYS", "ENOTTY"):
        return (f"the loaded nvidia-uvm does not know UVM_KVC_QUERY ({exc.status}): a stock driver, "
                f"not the pyvattn patch (see docs/uvm64k.md, `sudo make install-driver`)")
    if isinstance(exc, UvmError) and exc.status == "NV_ERR_NOT_SUPPORTED":
        return (f"the patched nvidia-uvm refuses KVC ABI version {_abi().UVM_KVC_ABI_VERSION} "
                f"(NV_ERR_NOT_SUPPORTED): module and pyvattn are from different releases")
    return str(exc)


class UvmBackend(Backend):
    name = "uvm64k"

    def __init__(self, device: torch.device = torch.device("cuda"), page_size: int = GRANULE):
        super().__init__(device, page_size)
        self.check_page_size(self.device, self.page_size)
        self._uvm = _abi()
        ordinal = _ordinal(self.device)
        self.device = torch.device("cuda", ordinal)
        # Retaining the primary context (torch's) makes CUDA register the GPU and its VA space
        # with UVM, so the fd we look for exists and has the GPU.
        self._primary = cuda.PrimaryContext(ordinal)
        self._dev = self._primary.dev
        try:
            self._uuid = gpu_uuid(ordinal)
            self.fd, info = self._find_fd()
        except BaseException:
            self._primary.release()
            raise
        self.max_batch = int(info.maxBatch)
        self._facts = {"module_magic": f"{int(info.magic):#x}",
                       "abi_version": self._uvm.UVM_KVC_ABI_VERSION,
                       "page_sizes": list(PAGE_SIZES), "granularity": GRANULE,
                       "max_batch": self.max_batch, "uvm_fd": self.fd}
        self._facts["module_version"] = module_version()
        # A page is one handle of page_size where the module allocates that size, else 2 or 4
        # 64K handles at consecutive VAs (the PTEs are 64K either way).
        supported = int(info.supportedPageSizes)
        self._unit = self.page_size if supported & self.page_size else GRANULE
        self._k = self.page_size // self._unit  # handles per page
        self._facts["supported_page_sizes"] = [s for s in PAGE_SIZES if supported & s]
        self._facts["handles_per_page"] = self._k
        self._facts["process_limit_bytes"] = int(info.processLimitBytes)  # 0: no per-process cap
        self._facts["gpu_limit_bytes"] = int(info.gpuLimitBytes)
        self._facts["max_mappings_per_page"] = int(info.maxMappingsPerPage)
        self.max_mappings = int(info.maxMappingsPerPage)  # the module refcounts a page's PTEs, up to this
        self._parts: dict[int, list[int]] = {}  # page handle (its first module handle) -> module handles
        self._spans: dict[int, int] = {}  # reservation base -> length of its UVM range (whole 2 MiB)
        self._scatter = "UVM_KVC_MAP_SCATTER" in self._uvm.IOCTLS
        #: ioctls made, by name (for tests and benchmarks).
        self.calls: Counter[str] = Counter()

    # --- discovery ---------------------------------------------------------------------------
    @classmethod
    def probe(cls, device: torch.device) -> Probe:
        device = torch.device(device)
        if device.type != "cuda":
            return Probe(False, f"uvm64k serves CUDA devices only, not {device}")
        try:
            uvm = _abi()
        except (ImportError, OSError) as exc:
            return Probe(False, f"cannot read the ioctl ABI header: {exc}")
        try:
            cuda.init()
            ordinal = _ordinal(device)
            count = cuda.device_count()
            if ordinal >= count:
                return Probe(False, f"no CUDA device {ordinal}: the driver sees {count}")
            uuid = gpu_uuid(ordinal)
            fds = uvm_fds()
            if not fds:  # CUDA opens its UVM fds at init or at first context: make sure
                dev = cuda.device_get(ordinal)
                ctx = cuda.ffi.new("CUcontext *")
                cuda.check("cuDevicePrimaryCtxRetain", cuda.lib().cuDevicePrimaryCtxRetain(ctx, dev))
                cuda.lib().cuDevicePrimaryCtxRelease_v2(dev)
                fds = uvm_fds()
        except (BackendUnavailable, CudaError) as exc:
            return Probe(False, f"no usable CUDA: {exc}")
        if not fds:
            return Probe(False, f"no {UVM_DEVICE} descriptor is open in this process after CUDA "
                                f"initialised (is nvidia-uvm loaded?)")
        reasons, answered = [], []
        for fd in fds:
            try:
                answered.append((fd, query(fd, uuid)))
            except (OSCallError, UvmError, BackendUnavailable) as exc:
                reasons.append(_why_not(exc))
        for _fd, info in answered:
            if info.gpuState & uvm.UVM_KVC_GPU_REGISTERED and not info.gpuState & uvm.UVM_KVC_GPU_SUPPORTED:
                return Probe(False, f"the patched nvidia-uvm does not support {device} "
                                    f"(pre-Pascal, big page size not 64K, confidential computing or "
                                    f"SR-IOV heavy vGPU)")
        if answered:  # prefer naming the fd the backend will use
            fd, info = next(((fd, i) for fd, i in answered if i.fdType == uvm.UVM_KVC_FD_VA_SPACE), answered[0])
            quota = int(info.processLimitBytes)
            return Probe(True, f"patched nvidia-uvm (KVC ABI {uvm.UVM_KVC_ABI_VERSION}) answers on fd "
                               f"{fd}: 64 KiB pages, {int(info.maxBatch)} per ioctl, per-process cap "
                               + (f"{quota >> 20} MiB" if quota else "none")
                               + f", all processes {int(info.gpuLimitBytes) >> 20} MiB")
        return Probe(False, "; ".join(dict.fromkeys(reasons)))

    @classmethod
    def granularity(cls, device: torch.device) -> int:
        return GRANULE

    @classmethod
    def check_page_size(cls, device: torch.device, page_size: int) -> None:
        if torch.device(device).type != "cuda":
            raise ValueError(f"device={device} is not a CUDA device; the uvm64k backend serves CUDA only")
        if page_size not in PAGE_SIZES:
            raise ValueError(f"page_size={page_size} is not one of the uvm64k backend's page sizes "
                             f"{list(PAGE_SIZES)}")

    def describe(self) -> dict:
        return {**super().describe(), **self._facts}

    def bytes_held(self) -> int:
        """GPU memory the module says this backend's fd holds for its pages on this GPU (whole
        2 MiB roots, so at least what the pages need), from ``UVM_KVC_QUERY``."""
        self._check_open()
        return int(query(self.fd, self._uuid).fdBytes)

    def _find_fd(self):
        """CUDA's va_space fd that has this GPU's VA space, and its QUERY answer."""
        uvm, seen = self._uvm, []
        for fd in uvm_fds():
            try:
                info = query(fd, self._uuid)
            except (OSCallError, UvmError, BackendUnavailable) as exc:
                seen.append(f"fd {fd}: {_why_not(exc)}")
                continue
            if info.fdType != uvm.UVM_KVC_FD_VA_SPACE:
                seen.append(f"fd {fd}: not a va_space fd (type {int(info.fdType)})")
            elif not info.callerState & uvm.UVM_KVC_CALLER_OWNS_VA_SPACE:
                seen.append(f"fd {fd}: belongs to another process (inherited across fork)")
            elif not info.gpuState & uvm.UVM_KVC_GPU_HAS_VA_SPACE:
                seen.append(f"fd {fd}: {self.device} has no GPU VA space there")
            elif not info.gpuState & uvm.UVM_KVC_GPU_SUPPORTED:
                raise BackendUnavailable(f"the patched nvidia-uvm does not support {self.device}")
            else:
                return fd, info
        raise BackendUnavailable(f"no {UVM_DEVICE} fd of this process serves {self.device}: "
                                 + ("; ".join(seen) or "none is open"))

    # --- ioctls ------------------------------------------------------------------------------
    def _ioctl(self, name: str, **fields):
        uvm = self._uvm
        self.calls[name] += 1
        return uvm.ioctl(self.fd, uvm.IOCTLS[name], uvm.params(name, **fields))

    def _u64_array(self, values):
        arr = self._uvm.ffi.new("NvU64[]", len(values))
        np.frombuffer(self._uvm.ffi.buffer(arr), dtype=np.uint64)[:] = values
        return arr, int(self._uvm.ffi.cast("uintptr_t", arr))

    def _batches(self, n: int):
        """``(lo, hi)`` slices of ``n`` module handles, at most ``maxBatch`` each and cut between
        pages (a page of ``k`` handles never straddles two ioctls, so each ioctl is whole pages)."""
        size = max(self._k, self.max_batch // self._k * self._k)
        return ((i, min(i + size, n)) for i in range(0, n, size))

    # --- driver calls ------------------------------------------------------------------------
    def _reserve(self, nbytes: int) -> int:
        length = -(-nbytes // _RESERVE_ALIGN) * _RESERVE_ALIGN  # the module's ranges: whole 2 MiB
        span = length + _RESERVE_ALIGN
        raw = libc.mmap(0, span, libc.PROT_NONE, libc.MAP_PRIVATE | libc.MAP_ANONYMOUS | libc.MAP_NORESERVE)
        base = -(-raw // _RESERVE_ALIGN) * _RESERVE_ALIGN
        try:  # munmap of what is already gone is no error: undoing the whole span is always right
            if base > raw:
                libc.munmap(raw, base - raw)
            if raw + span > base + length:
                libc.munmap(base + length, raw + span - base - length)
            self._ioctl("UVM_KVC_CREATE_RANGE", base=base, length=length)
        except BaseException as exc:
            raise undo_one(exc, libc.munmap, raw, span)
        self._spans[base] = length
        return base

    def _unreserve(self, base: int, nbytes: int) -> None:
        length = self._spans[base]
        self._ioctl("UVM_FREE", base=base, length=length)  # UVM lets go of the VA first
        del self._spans[base]
        libc.munmap(base, length)

    def _create(self, count: int, at, undo: Undo) -> list[int]:
        if at is not None:
            raise ValueError("at: the uvm64k backend does not place pages")
        n = count * self._k
        arr, ptr = self._u64_array(np.zeros(n, dtype=np.uint64))
        for lo, hi in self._batches(n):
            self._ioctl("UVM_KVC_ALLOC", gpuUuid=self._uuid, pageSize=self._unit, count=hi - lo,
                        handlesPtr=ptr + 8 * lo)
            undo.push(self._free_handles, [int(h) for h in arr[lo:hi]])
        made = [int(h) for h in arr]
        pages = []
        for i in range(0, n, self._k):
            group = made[i:i + self._k]
            self._parts[group[0]] = group
            pages.append(group[0])
        return pages

    def _free_handles(self, handles: list[int]) -> None:
        """UVM_KVC_FREE of module handles, in batches of maxBatch."""
        if not handles:
            return
        arr, ptr = self._u64_array(handles)
        for lo, hi in self._batches(len(handles)):
            self._ioctl("UVM_KVC_FREE", count=hi - lo, handlesPtr=ptr + 8 * lo)

    def _release(self, handles: list[int], done: list[int]) -> None:
        per_call = max(1, self.max_batch // self._k)  # whole pages per FREE, so the books stay exact
        for i in range(0, len(handles), per_call):
            chunk = handles[i:i + per_call]
            self._free_handles([g for h in chunk for g in self._parts[h]])
            for h in chunk:
                del self._parts[h]
            done.extend(chunk)

    def _map(self, batch: Runs, undo: Undo) -> None:
        """``UVM_KVC_MAP`` per VA-contiguous run, or ``UVM_KVC_MAP_SCATTER`` when the pages are
        scattered, whichever takes fewer ioctls (batches of at most ``maxBatch`` module handles)."""
        k, unit = self._k, self._unit
        # one entry per module handle, in VA order; a run of pages is a run of handles
        if k == 1:
            gvas, ghandles = batch.vas.tolist(), batch.handles.tolist()
        else:
            gvas = [v + j * unit for v in batch.vas.tolist() for j in range(k)]
            ghandles = [g for h in batch.handles.tolist() for g in self._parts[h]]
        glens = (batch.lengths * k).tolist()
        run_calls = sum(-(-m // self.max_batch) for m in glens)
        scatter_calls = -(-len(gvas) // self.max_batch)
        if self._scatter and scatter_calls < run_calls:
            self._map_scatter(gvas, ghandles, undo)
        else:
            self._map_runs(batch.vas[batch.starts].tolist(), glens, ghandles, undo)

    def _map_flags(self) -> int:
        return self._uvm.UVM_KVC_MAP_FLAGS_NO_REPLACE  # never replace by mistake

    def _map_runs(self, starts, lengths, ghandles, undo: Undo) -> None:
        unit, P = self._unit, self.page_size
        arr = self._uvm.ffi.new("NvU64[]", ghandles)
        ptr = int(self._uvm.ffi.cast("uintptr_t", arr))
        first = 0
        for base, n in zip(starts, lengths):
            for lo, hi in self._batches(n):
                va = base + lo * unit
                self._ioctl("UVM_KVC_MAP", flags=self._map_flags(), gpuUuid=self._uuid,
                            base=va, count=hi - lo, handlesPtr=ptr + 8 * (first + lo))
                undo.push(self._unmap_pages, list(range(va, va + (hi - lo) * unit, P)))
            first += n

    def _map_scatter(self, gvas, ghandles, undo: Undo) -> None:
        uvm = self._uvm
        entry = uvm.SCATTER_ENTRY
        n = len(gvas)
        arr = uvm.ffi.new(f"{entry}[]", n)
        table = np.frombuffer(uvm.ffi.buffer(arr), dtype=np.uint64).reshape(n, -1)
        va_col, handle_col = uvm.SCATTER_FIELDS
        table[:, va_col], table[:, handle_col] = gvas, ghandles
        ptr = int(uvm.ffi.cast("uintptr_t", arr))
        size = uvm.ffi.sizeof(entry)
        for lo, hi in self._batches(n):
            self._ioctl("UVM_KVC_MAP_SCATTER", flags=self._map_flags(), gpuUuid=self._uuid,
                        entriesPtr=ptr + size * lo, count=hi - lo)
            undo.push(self._unmap_pages, gvas[lo:hi:self._k])

    def _unmap_pages(self, vas: list[int]) -> None:
        """Take back maps of whole pages at ``vas`` (no device sync: nothing has used them yet)."""
        self._unmap_ranges([(va, n * self.page_size) for va, n in runs(vas, self.page_size).spans()])

    def _unmap_ranges(self, ranges) -> None:
        """``UVM_KVC_UNMAP`` of each ``(base, length)``."""
        uvm = self._uvm
        p = uvm.params("UVM_KVC_UNMAP", gpuUuid=self._uuid)  # one struct, reused per range
        for base, length in ranges:
            p.base, p.length, p.rmStatus = base, length, 0
            self.calls["UVM_KVC_UNMAP"] += 1
            uvm.ioctl(self.fd, uvm.UVM_KVC_UNMAP, p)

    def _unmap(self, batch: Runs, done: list[tuple[int, int]]) -> None:
        """Unmap pages once all work issued before the call is done.

        The ioctl itself waits for its own PTE clear and TLB invalidate, not for kernels still
        reading the pages: a kernel touching an unmapped page is a fatal fault, and a page mapped
        elsewhere right after could be overwritten under it. So the device is synchronized first.
        """
        self.synchronize()
        for va, n in batch.spans():
            self._unmap_ranges([(va, n * self.page_size)])
            done.append((va, n))

    def _shutdown(self) -> None:
        """Drop the primary-context reference. CUDA's fd stays open: it is CUDA's."""
        self._primary.release()

    def _out_of_memory(self, exc) -> bool:
        return isinstance(exc, UvmError) and exc.status in _OOM

    # --- access ------------------------------------------------------------------------------
    def tensor(self, base: int, nbytes: int) -> torch.Tensor:
        return device_tensor(base, nbytes, self.device)

    def _context(self):
        """The device's primary context, current on the calling thread for the ``with`` block."""
        return self._primary.current()

    def synchronize(self) -> None:
        """Wait for all work on the device's primary context (torch's streams included)."""
        self._primary.synchronize()

    def mem_info(self) -> tuple[int, int]:
        """(free, total) device memory in bytes, as the driver reports it."""
        return self._primary.mem_info()


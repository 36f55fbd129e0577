"""cuda-vmm backend: stock NVIDIA drivers, the CUDA driver's virtual memory management API.

* A reservation is ``cuMemAddressReserve``: device virtual addresses, no memory behind them.
* A physical page is one ``cuMemCreate`` handle of ``page_size`` bytes of pinned device memory
  (``page_size`` is a multiple of the device's granularity, 2 MiB on current GPUs).
* Mapping is one ``cuMemMap`` per page (the driver maps a handle whole, at offset 0), then one
  ``cuMemSetAccess`` per run of pages that is contiguous in VA: access setting is the expensive
  call (tens of µs), so a step that grows a request in 2 x num_layers regions makes one per region
  run, not one per page.
* Unmapping synchronizes the context first, then ``cuMemUnmap`` per page (a call must cover
  exactly one earlier mapping). The handles stay alive for the pool to reuse.

The backend uses the device's *primary* context, the one torch uses, so the tensors it hands out
are ordinary CUDA tensors to torch and to every kernel.
"""

from __future__ import annotations

from collections import Counter
from typing import Sequence

import torch

from .._ffi import cuda
from .._ffi.dlpack import device_tensor
from ..errors import BackendUnavailable, CudaError, OutOfPages
from .base import Backend, MiB, Probe, contiguous_runs


def _ordinal(device: torch.device) -> int:
    device = torch.device(device)
    if device.index is not None:
        return device.index
    # torch's current device when torch has set one up; device 0 otherwise (without initializing
    # torch's CUDA state just to ask).
    if torch.cuda.is_initialized():
        return torch.cuda.current_device()
    return 0


class CudaVmmBackend(Backend):
    name = "cuda-vmm"

    _granularity: dict[int, int] = {}

    def __init__(self, device: torch.device = torch.device("cuda"), page_size: int = 2 * MiB):
        super().__init__(device, page_size)
        if self.device.type != "cuda":
            raise ValueError(f"device={device} is not a CUDA device; the cuda-vmm backend serves CUDA only")
        ordinal = _ordinal(self.device)
        self.device = torch.device("cuda", ordinal)
        self.check_page_size(self.device, self.page_size)
        self._lib = cuda.lib()
        self._primary = cuda.PrimaryContext(ordinal)
        self._dev = self._primary.dev
        self._closed = False
        self._facts: dict | None = None
        self._handle_out = cuda.ffi.new("CUmemGenericAllocationHandle *")
        self._prop = cuda.allocation_prop(self._dev)
        self._access = cuda.access_desc(self._dev)
        self._reservations: dict[int, int] = {}  # base -> nbytes
        self._live: set[int] = set()  # handles created and not released
        self._mapped: dict[int, int] = {}  # va -> handle
        self._mapped_handles: set[int] = set()
        #: Driver calls made, by name (for tests and benchmarks).
        self.calls: Counter[str] = Counter()
        with self._context():
            pass  # leaves the primary context current on this thread if none was

    # --- discovery ---------------------------------------------------------------------------
    @classmethod
    def probe(cls, device: torch.device) -> Probe:
        device = torch.device(device)
        if device.type != "cuda":
            return Probe(False, f"cuda-vmm serves CUDA devices only, not {device}")
        try:
            cuda.init()
            count = cuda.device_count()
            ordinal = _ordinal(device)
            if ordinal >= count:
                return Probe(False, f"no CUDA device {ordinal}: the driver sees {count}")
            dev = cuda.device_get(ordinal)
            if not cuda.device_attribute(cuda.CU_DEVICE_ATTRIBUTE_VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED, dev):
                return Probe(False, f"{cuda.device_name(dev)} does not support CUDA virtual memory management")
            version = cuda.driver_version()
            gran = cls.granularity(device)
        except BackendUnavailable as exc:
            return Probe(False, str(exc))
        except CudaError as exc:
            return Probe(False, f"CUDA driver: {exc}")
        return Probe(True, f"CUDA driver API {version // 1000}.{version % 1000 // 10} VMM on "
                           f"{cuda.device_name(dev)}, granularity {gran // 1024} KiB")

    @classmethod
    def granularity(cls, device: torch.device) -> int:
        ordinal = _ordinal(device)
        if ordinal not in cls._granularity:
            cls._granularity[ordinal] = cuda.allocation_granularity(
                cuda.device_get(ordinal), cuda.CU_MEM_ALLOC_GRANULARITY_MINIMUM)
        return cls._granularity[ordinal]

    @classmethod
    def check_page_size(cls, device: torch.device, page_size: int) -> None:
        if torch.device(device).type != "cuda":
            raise ValueError(f"device={device} is not a CUDA device; the cuda-vmm backend serves CUDA only")
        super().check_page_size(device, page_size)

    def describe(self) -> dict:
        if self._facts is None:  # stats() calls this often; the facts never change
            version = cuda.driver_version()
            self._facts = {"driver_version": f"{version // 1000}.{version % 1000 // 10}",
                           "device_name": cuda.device_name(self._dev),
                           "granularity": self.granularity(self.device)}
        return {**super().describe(), **self._facts}

    # --- context -----------------------------------------------------------------------------
    def _context(self):
        """The device's primary context, current on the calling thread for the ``with`` block."""
        self._check_open()
        return self._primary.current()

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("this cuda-vmm backend is closed")

    # --- virtual ranges ----------------------------------------------------------------------
    def reserve(self, nbytes: int) -> int:
        if nbytes <= 0 or nbytes % self.page_size:
            raise ValueError(f"nbytes={nbytes} is not a positive multiple of page_size={self.page_size}")
        align = self.page_size & -self.page_size  # largest power of two dividing page_size
        out = cuda.ffi.new("CUdeviceptr *")
        with self._context() as lib:
            cuda.check("cuMemAddressReserve", lib.cuMemAddressReserve(out, nbytes, align, 0, 0))
        self._reservations[out[0]] = nbytes
        return out[0]

    def unreserve(self, base: int, nbytes: int) -> None:
        if self._reservations.get(base) != nbytes:
            raise ValueError(f"base={base:#x} nbytes={nbytes} is not a live reservation")
        if any(base <= va < base + nbytes for va in self._mapped):
            raise ValueError(f"reservation {base:#x} still has mapped pages; unmap them first")
        with self._context() as lib:
            cuda.check("cuMemAddressFree", lib.cuMemAddressFree(base, nbytes))
        del self._reservations[base]

    # --- physical pages ----------------------------------------------------------------------
    def create_pages(self, count: int) -> list[int]:
        if count < 0:
            raise ValueError(f"count={count} must be >= 0")
        handles: list[int] = []
        out, P, prop = self._handle_out, self.page_size, self._prop
        with self._context() as lib:
            for _ in range(count):
                status = lib.cuMemCreate(out, P, prop, 0)
                self.calls["cuMemCreate"] += 1
                if status != cuda.CUDA_SUCCESS:
                    for h in handles:  # all or nothing
                        lib.cuMemRelease(h)
                    if status == cuda.CUDA_ERROR_OUT_OF_MEMORY:
                        raise OutOfPages(f"device memory exhausted creating {count} pages of {P} bytes "
                                         f"({len(handles)} succeeded)", needed=count, available=len(handles))
                    cuda.check("cuMemCreate", status)
                handles.append(out[0])
        self._live.update(handles)
        return handles

    def release_pages(self, handles: Sequence[int]) -> None:
        bad = [h for h in handles if h not in self._live or h in self._mapped_handles]
        if bad:
            raise ValueError(f"handles {bad[:4]} are not live, unmapped pages of this backend")
        first_error = None
        with self._context() as lib:
            for h in handles:
                status = lib.cuMemRelease(h)
                self.calls["cuMemRelease"] += 1
                if status == cuda.CUDA_SUCCESS:
                    self._live.discard(h)
                elif first_error is None:
                    first_error = status
        if first_error is not None:
            cuda.check("cuMemRelease", first_error)

    # --- mapping -----------------------------------------------------------------------------
    def _check_runs(self, starts: list[int], lengths: list[int]) -> None:
        P = self.page_size
        for va, n in zip(starts, lengths):
            end = va + n * P
            if va % P or not any(b <= va and end <= b + size for b, size in self._reservations.items()):
                raise ValueError(f"vas: [{va:#x}, {end:#x}) is not page-aligned inside a reservation")

    def map(self, vas: Sequence[int], handles: Sequence[int]) -> None:
        if len(vas) != len(handles):
            raise ValueError(f"len(vas)={len(vas)} != len(handles)={len(handles)}")
        if not vas:
            return
        P = self.page_size
        starts, _, lengths = contiguous_runs(vas, None, P)
        if sum(lengths) != len(vas) or len(set(vas)) != len(vas):
            raise ValueError("vas: duplicates in one batch")
        self._check_runs(starts, lengths)
        if any(va in self._mapped for va in vas):
            raise ValueError("vas: some are already mapped")
        if len(set(handles)) != len(handles) or not self._live.issuperset(handles) \
                or not self._mapped_handles.isdisjoint(handles):
            raise ValueError("handles: some are not live, unmapped, distinct pages of this backend")
        done: list[int] = []
        with self._context() as lib:
            try:
                for va, h in zip(vas, handles):
                    status = lib.cuMemMap(va, P, 0, h, 0)
                    self.calls["cuMemMap"] += 1
                    if status != cuda.CUDA_SUCCESS:
                        self._raise_map_error("cuMemMap", status, len(vas))
                    done.append(va)
                for va, n in zip(starts, lengths):
                    status = lib.cuMemSetAccess(va, n * P, self._access, 1)
                    self.calls["cuMemSetAccess"] += 1
                    if status != cuda.CUDA_SUCCESS:
                        self._raise_map_error("cuMemSetAccess", status, len(vas))
            except BaseException:
                for va in done:  # all or nothing; nothing touched these pages yet
                    lib.cuMemUnmap(va, P)
                raise
        self._mapped.update(zip(vas, handles))
        self._mapped_handles.update(handles)

    @staticmethod
    def _raise_map_error(call: str, status: int, count: int) -> None:
        if status == cuda.CUDA_ERROR_OUT_OF_MEMORY:
            raise OutOfPages(f"{call}: device memory exhausted mapping {count} pages", needed=count)
        cuda.check(call, status)

    def unmap(self, vas: Sequence[int]) -> None:
        """Unmap pages once all work issued before the call is done.

        ``cuMemUnmap`` is not documented to wait for kernels still reading the range (PyTorch's
        expandable segments found it does not in all cases), and a kernel that touches an unmapped
        page faults the whole context. Worse, the page may be mapped under another request right
        after and be overwritten under a running kernel. So the context is synchronized first:
        unmapping only happens when pages are reclaimed, never on the per-token hot path.
        """
        if not vas:
            return
        missing = [va for va in vas if va not in self._mapped]
        if missing:
            raise ValueError(f"vas: {[hex(v) for v in missing[:4]]} are not mapped")
        P = self.page_size
        done: list[int] = []
        with self._context() as lib:
            cuda.check("cuCtxSynchronize", lib.cuCtxSynchronize())
            try:
                for va in vas:
                    status = lib.cuMemUnmap(va, P)
                    self.calls["cuMemUnmap"] += 1
                    cuda.check("cuMemUnmap", status)
                    self._mapped_handles.discard(self._mapped.pop(va))
                    done.append(va)
            except CudaError as exc:
                exc.unmapped_vas = done
                raise

    # --- access ------------------------------------------------------------------------------
    def tensor(self, base: int, nbytes: int) -> torch.Tensor:
        return device_tensor(base, nbytes, self.device)

    def synchronize(self) -> None:
        self._check_open()
        self._primary.synchronize()

    def mem_info(self) -> tuple[int, int]:
        """(free, total) device memory in bytes, as the driver reports it."""
        self._check_open()
        return self._primary.mem_info()

    def close(self) -> None:
        """Unmap, release and unreserve everything, then drop the primary-context reference.
        Idempotent. Errors are collected and the first is raised after every step was tried;
        ``CUDA_ERROR_DEINITIALIZED`` (the driver is already shutting down at exit) is ignored."""
        if self._closed:
            return
        errors: list[CudaError] = []

        def attempt(call: str, status: int) -> None:
            if status not in (cuda.CUDA_SUCCESS, cuda.CUDA_ERROR_DEINITIALIZED):
                errors.append(CudaError(call, cuda.error_name(status), status))

        lib = self._lib
        cur = cuda.ffi.new("CUcontext *")
        lib.cuCtxGetCurrent(cur)
        prev = cur[0]
        attempt("cuCtxSetCurrent", lib.cuCtxSetCurrent(self._primary.ctx))
        if self._mapped:
            attempt("cuCtxSynchronize", lib.cuCtxSynchronize())
        for va in list(self._mapped):
            attempt("cuMemUnmap", lib.cuMemUnmap(va, self.page_size))
        for h in list(self._live):
            attempt("cuMemRelease", lib.cuMemRelease(h))
        for base, nbytes in list(self._reservations.items()):
            attempt("cuMemAddressFree", lib.cuMemAddressFree(base, nbytes))
        if prev != self._primary.ctx:
            lib.cuCtxSetCurrent(prev)
        attempt("cuDevicePrimaryCtxRelease_v2", self._primary.release())
        self._mapped.clear()
        self._mapped_handles.clear()
        self._live.clear()
        self._reservations.clear()
        self._closed = True
        if errors:
            raise errors[0]

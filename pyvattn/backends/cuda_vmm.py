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

import torch

from .._ffi import cuda
from .._ffi.dlpack import device_tensor
from ..errors import BackendUnavailable, CudaError
from .base import Backend, MiB, Probe, Runs, Undo


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
        self._primary = cuda.PrimaryContext(ordinal)
        self._dev = self._primary.dev
        self._facts: dict | None = None
        self._handle_out = cuda.ffi.new("CUmemGenericAllocationHandle *")
        self._prop = cuda.allocation_prop(self._dev)
        self._access = cuda.access_desc(self._dev)
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
        return self._primary.current()

    def _call(self, lib, name: str, *args) -> None:
        """One driver call, counted; a failure raises ``CudaError`` with the status name."""
        self.calls[name] += 1
        cuda.check(name, getattr(lib, name)(*args))

    # --- driver calls ------------------------------------------------------------------------
    def _reserve(self, nbytes: int) -> int:
        align = self.page_size & -self.page_size  # largest power of two dividing page_size
        out = cuda.ffi.new("CUdeviceptr *")
        with self._context() as lib:
            self._call(lib, "cuMemAddressReserve", out, nbytes, align, 0, 0)
        return out[0]

    def _unreserve(self, base: int, nbytes: int) -> None:
        with self._context() as lib:
            self._call(lib, "cuMemAddressFree", base, nbytes)

    def _create(self, count: int, at, undo: Undo) -> list[int]:
        if at is not None:
            raise ValueError("at: the cuda-vmm backend does not place pages")
        handles: list[int] = []
        out, P, prop = self._handle_out, self.page_size, self._prop
        with self._context() as lib:
            for _ in range(count):
                self._call(lib, "cuMemCreate", out, P, prop, 0)
                handles.append(out[0])
                undo.push(self._release_now, [out[0]])
        return handles

    def _release_now(self, handles: list[int]) -> None:
        self._release(handles, [])

    def _release(self, handles: list[int], done: list[int]) -> None:
        """Release every handle, going on past a failure; the first failure is raised at the end."""
        cleanup = Undo()
        with self._context() as lib:
            for h in handles:
                if cleanup.attempt(self._call, lib, "cuMemRelease", h):
                    done.append(h)
        cleanup.raise_first()

    def _map(self, batch: Runs, undo: Undo) -> None:
        """One ``cuMemMap`` per page (the driver maps a handle whole), then one ``cuMemSetAccess``
        per run contiguous in VA: access setting is the expensive call."""
        P = self.page_size
        with self._context() as lib:
            for va, h in zip(batch.vas.tolist(), batch.handles.tolist()):
                self._call(lib, "cuMemMap", va, P, 0, h, 0)
                undo.push(self._unmap_pages, [va])
            for va, n in batch.spans():
                self._call(lib, "cuMemSetAccess", va, n * P, self._access, 1)

    def _unmap_pages(self, vas: list[int]) -> None:
        with self._context() as lib:
            for va in vas:
                self._call(lib, "cuMemUnmap", va, self.page_size)

    def _unmap(self, batch: Runs, done: list[tuple[int, int]]) -> None:
        """Unmap pages once all work issued before the call is done.

        ``cuMemUnmap`` is not documented to wait for kernels still reading the range (PyTorch's
        expandable segments found it does not in all cases), and a kernel that touches an unmapped
        page faults the whole context. Worse, the page may be mapped under another request right
        after and be overwritten under a running kernel. So the context is synchronized first:
        unmapping only happens when pages are reclaimed, never on the per-token hot path.
        """
        with self._context() as lib:
            self._call(lib, "cuCtxSynchronize")
            for va in batch.vas.tolist():  # a call must cover exactly one earlier mapping
                self._call(lib, "cuMemUnmap", va, self.page_size)
                done.append((va, 1))

    def _shutdown(self) -> None:
        """Drop the primary-context reference (the context of whichever thread closes stays)."""
        status = self._primary.release()
        if status not in (cuda.CUDA_SUCCESS, cuda.CUDA_ERROR_DEINITIALIZED):
            cuda.check("cuDevicePrimaryCtxRelease_v2", status)

    def _out_of_memory(self, exc) -> bool:
        return isinstance(exc, CudaError) and exc.status == "CUDA_ERROR_OUT_OF_MEMORY"

    def _driver_gone(self, exc: BaseException) -> bool:
        # at interpreter exit the driver may already have torn everything down
        return isinstance(exc, CudaError) and exc.status == "CUDA_ERROR_DEINITIALIZED"

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

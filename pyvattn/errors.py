"""Exceptions raised by pyvattn.

Every driver failure becomes a :class:`DriverError` subclass that carries the driver's own status
name (``CUDA_ERROR_OUT_OF_MEMORY``, ``NV_ERR_INVALID_ADDRESS``, ``ENOMEM``), so a serving system can
log and branch on it without parsing messages.
"""

from __future__ import annotations


class PyvattnError(Exception):
    """Base class of every error pyvattn raises on purpose."""


class OutOfPages(PyvattnError, MemoryError):
    """Physical pages ran out (pool budget or device memory).

    Raised before anything is half-mapped: the cache stays usable and no request's data changed.
    """

    def __init__(self, message: str, *, needed: int = 0, available: int = 0):
        super().__init__(message)
        self.needed = needed
        self.available = available


class LedgerError(PyvattnError, RuntimeError):
    """A :class:`pyvattn.SharedBudget` ledger cannot be used as it is."""


class LedgerNotFound(LedgerError, FileNotFoundError):
    """No ledger of that name (``SharedBudget(name, create=False)``, ``python -m pyvattn top --name``)."""


class LedgerCorrupt(LedgerError):
    """The ledger file is not a pyvattn budget ledger of this version (bad magic, version or size)."""


class LedgerFull(LedgerError):
    """Every account slot of the ledger belongs to a live process."""


class BudgetLimitConflict(PyvattnError, ValueError):
    """A :class:`pyvattn.SharedBudget` was opened with a limit other than the one its ledger has."""


class BackendUnavailable(PyvattnError, RuntimeError):
    """The requested backend cannot run here (no GPU, no libcuda, module not loaded, ...)."""


class DriverError(PyvattnError, RuntimeError):
    """A call into the OS, CUDA or the UVM driver failed.

    ``status`` is the driver's status name, ``code`` its numeric value, ``call`` the failing call.
    """

    def __init__(self, call: str, status: str, code: int, detail: str = ""):
        msg = f"{call} failed: {status} ({code})"
        if detail:
            msg += f": {detail}"
        super().__init__(msg)
        self.call = call
        self.status = status
        self.code = code
        # set by a backend's unmap() that failed part-way: the addresses it did unmap
        self.unmapped_vas: list[int] = []


def note_cleanup_failure(exc: BaseException, what: str, cleanup_exc: BaseException) -> None:
    """Keep ``exc`` the error a caller sees when the clean-up after it fails too, and say so on
    it (``add_note`` from Python 3.11; the clean-up error is also ``exc.cleanup_error``)."""
    exc.cleanup_error = cleanup_exc
    if hasattr(exc, "add_note"):
        exc.add_note(f"clean-up ({what}) also failed: {cleanup_exc!r}")


class OSCallError(DriverError):
    """A libc call failed; ``status`` is the errno name (``ENOMEM``, ``EINVAL``...)."""


class CudaError(DriverError):
    """A CUDA driver API call failed; ``status`` is the CUresult name."""


class UvmError(DriverError):
    """A pyvattn UVM ioctl failed; ``status`` is the NV_STATUS name (``NV_ERR_...``)."""


class OutOfSlots(PyvattnError, RuntimeError):
    """Every request slot (``max_batch_size`` of them) is in use."""

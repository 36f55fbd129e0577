"""pyvattn: vAttention KV-cache memory for LLM serving.

Each request's KV cache lives in contiguous virtual memory; physical pages are mapped under it on
demand, so unmodified attention kernels run on the plain tensors ``cache.k[layer]`` and
``cache.v[layer]``.

    >>> import torch, pyvattn
    >>> with pyvattn.KVCache(num_layers=2, num_kv_heads=2, head_dim=64, max_batch_size=4,
    ...                      max_seq_len=1024, dtype=torch.float16, device="cpu") as cache:
    ...     slot = cache.alloc_slot()
    ...     cache.step({slot: 100})          # map what the next forward pass writes
    ...     cache.k[0][slot, :100] = 1.0     # [batch, seq, kv_heads, head_dim]
"""

from .errors import (
    BackendUnavailable,
    BudgetLimitConflict,
    CudaError,
    DriverError,
    LedgerCorrupt,
    LedgerError,
    LedgerFull,
    LedgerNotFound,
    OSCallError,
    OutOfPages,
    OutOfSlots,
    PyvattnError,
    UvmError,
)

# Imported on first use (PEP 562), so that `python -m pyvattn <command> --help` and the error
# types load without torch: name -> (module, attribute).
_LAZY = {
    "KVCache": (".kvcache", "KVCache"),
    "VirtualBuffer": (".buffer", "VirtualBuffer"),
    "PagePool": (".pool", "PagePool"),
    "MemoryBudget": (".budget", "MemoryBudget"),
    "SharedBudget": (".budget", "SharedBudget"),
    "backend_names": (".backends", "backend_names"),
    "select_backend": (".backends", "select"),
}


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'pyvattn' has no attribute {name!r}")
    import importlib

    module, attr = _LAZY[name]
    value = getattr(importlib.import_module(module, __name__), attr)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__version__ = "0.1.0"

__all__ = [
    "KVCache", "VirtualBuffer", "PagePool", "MemoryBudget", "SharedBudget", "backend_names", "select_backend",
    "info", "PyvattnError", "OutOfPages", "OutOfSlots", "BackendUnavailable", "DriverError", "OSCallError",
    "CudaError", "UvmError", "LedgerError", "LedgerNotFound", "LedgerCorrupt", "LedgerFull", "BudgetLimitConflict",
]


def info(device: str | None = None) -> dict:
    """What ``python -m pyvattn info`` prints: backends available here and what ``auto`` picks."""
    from .info import collect

    return collect(device)

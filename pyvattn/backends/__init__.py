"""Backend registry and ``backend="auto"`` selection.

Backends are imported lazily, so ``import pyvattn`` never loads libcuda or touches /dev/nvidia-uvm.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

import torch

from ..errors import BackendUnavailable
from .base import Backend, Probe

#: name -> "module:Class"; order is the preference order of ``auto`` for GPU devices.
_REGISTRY = {
    "uvm64k": "pyvattn.backends.uvm:UvmBackend",
    "cuda-vmm": "pyvattn.backends.cuda_vmm:CudaVmmBackend",
    "host": "pyvattn.backends.host:HostBackend",
}


def backend_names() -> list[str]:
    return list(_REGISTRY)


def backend_class(name: str) -> type[Backend]:
    """The backend class registered as ``name`` (``ValueError`` naming ``backend`` if unknown)."""
    try:
        module, cls = _REGISTRY[name].split(":")
    except KeyError:
        raise ValueError(f"backend={name!r} is not one of {['auto', *_REGISTRY]}") from None
    return getattr(importlib.import_module(module), cls)


def probe(name: str, device: torch.device) -> Probe:
    """Probe one backend for ``device``; import errors become an unavailable probe."""
    try:
        cls = backend_class(name)
    except (ImportError, OSError) as exc:
        return Probe(False, f"cannot load: {exc}")
    try:
        return cls.probe(torch.device(device))
    except Exception as exc:  # a probe must never take the process down
        return Probe(False, f"probe failed: {exc}")


@dataclass(frozen=True)
class Selection:
    """The backend ``auto`` (or the user) chose for a device, and why."""

    name: str
    cls: type[Backend]
    reason: str


def select(backend: str, device: torch.device) -> Selection:
    """Resolve ``backend`` ("auto" or a name) for ``device``.

    ``auto`` on a CUDA device picks uvm64k when the patched module answers its probe, else cuda-vmm;
    on a CPU device it picks host. A named backend that cannot run raises ``BackendUnavailable``.
    """
    device = torch.device(device)
    if backend != "auto":
        if backend not in _REGISTRY:
            backend_class(backend)  # raises the ValueError naming `backend`
        p = probe(backend, device)
        if not p.available:
            raise BackendUnavailable(f"backend={backend!r} cannot run on {device}: {p.reason}")
        return Selection(backend, backend_class(backend), f"requested explicitly; {p.reason}")

    if device.type == "cpu":
        return Selection("host", backend_class("host"), "device is CPU: host memory via mmap/memfd")
    if device.type != "cuda":
        raise ValueError(f"device={device} is not supported (use 'cpu' or 'cuda[:N]')")

    skipped = []
    for name in ("uvm64k", "cuda-vmm"):
        p = probe(name, device)
        if p.available:
            why = f"{name}: {p.reason}"
            if skipped:
                why += "; skipped " + "; ".join(skipped)
            return Selection(name, backend_class(name), why)
        skipped.append(f"{name} ({p.reason})")
    raise BackendUnavailable(f"no backend can serve {device}: " + "; ".join(skipped))


__all__ = ["Backend", "Probe", "Selection", "backend_class", "backend_names", "probe", "select"]

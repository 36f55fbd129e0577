"""``python -m pyvattn info``: which backends can run here, which one ``auto`` picks, and why."""

from __future__ import annotations

import platform

import torch

from . import backends
from .errors import PyvattnError
from .units import format_size


def _default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def collect(device: str | None = None) -> dict:
    """Facts about this machine for ``device`` (default: CUDA if torch sees a GPU, else CPU)."""
    dev = torch.device(device) if device else _default_device()
    rows = []
    for name in backends.backend_names():
        probe_dev = dev if name != "host" else torch.device("cpu")
        if name != "host" and dev.type != "cuda":
            probe_dev = torch.device("cuda")
        p = backends.probe(name, probe_dev)
        row = {"backend": name, "device": str(probe_dev), "available": p.available, "reason": p.reason}
        if p.available:
            cls = backends.backend_class(name)
            row["granularity"] = cls.granularity(probe_dev)
            row["default_page_size"] = cls.default_page_size(probe_dev)
        rows.append(row)
    try:
        sel = backends.select("auto", dev)
        auto = {"backend": sel.name, "reason": sel.reason,
                "page_size": sel.cls.default_page_size(dev)}
    except PyvattnError as exc:
        auto = {"backend": None, "reason": str(exc), "page_size": None}
    return {
        "device": str(dev),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "platform": platform.platform(),
        "backends": rows,
        "auto": auto,
    }


def render(facts: dict) -> str:
    lines = [f"pyvattn on {facts['platform']}",
             f"torch {facts['torch']} (CUDA {facts['torch_cuda'] or 'none'}; "
             f"GPU visible: {facts['cuda_available']})", "",
             f"{'backend':<10} {'device':<8} {'available':<10} {'page size':<10} reason"]
    for r in facts["backends"]:
        size = format_size(r["default_page_size"]) if r.get("default_page_size") else "-"
        lines.append(f"{r['backend']:<10} {r['device']:<8} {('yes' if r['available'] else 'no'):<10} "
                     f"{size:<10} {r['reason']}")
    a = facts["auto"]
    lines.append("")
    if a["backend"]:
        lines.append(f"backend='auto' on {facts['device']} picks {a['backend']} "
                     f"(page size {format_size(a['page_size'])}): {a['reason']}")
    else:
        lines.append(f"backend='auto' on {facts['device']}: nothing can run: {a['reason']}")
    return "\n".join(lines)

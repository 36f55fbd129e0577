"""What the GPU benchmarks share: machine facts for their JSON, timing, percentiles, tables.

Imported by the scripts beside it (``scripts/`` is on ``sys.path`` when one of them runs, and
``gpu_suite.py`` puts it there when it runs them in-process).
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent


# --- facts --------------------------------------------------------------------------------------
def driver_release() -> str | None:
    """The NVIDIA kernel driver's release ("580.159.04"), or None where there is none."""
    try:
        m = re.search(r"Kernel Module\s+(\S+)", Path("/proc/driver/nvidia/version").read_text())
        if m:
            return m.group(1)
    except OSError:
        pass
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        return out.stdout.split("\n")[0].strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short=12", "HEAD"],
                             capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return (out.stdout.strip() + ("+dirty" if dirty else "")) or None
    except (OSError, subprocess.SubprocessError):
        return None


def machine_facts(device: torch.device | str | None = None) -> dict:
    """Device, driver, CUDA, torch, date (UTC) and the code's commit, for every results JSON."""
    device = torch.device(device) if device is not None else None
    gpu = device is not None and device.type == "cuda" and torch.cuda.is_available()
    facts = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": git_commit(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "gpu": torch.cuda.get_device_name(device) if gpu else None,
        "compute_capability": ".".join(map(str, torch.cuda.get_device_capability(device))) if gpu else None,
        "driver": driver_release() if gpu else None,
        "cuda_driver_api": None,
    }
    if gpu:
        try:
            from pyvattn._ffi import cuda

            v = cuda.driver_version()
            facts["cuda_driver_api"] = f"{v // 1000}.{v % 1000 // 10}"
        except Exception as exc:  # a fact we could not read is recorded, never fatal
            facts["cuda_driver_api"] = f"unknown ({exc})"
    return facts


# --- timing and statistics ----------------------------------------------------------------------
class Clock:
    """Elapsed milliseconds of a region: CUDA events on a GPU (GPU idle gaps included, so host
    stalls count), perf_counter on the CPU."""

    def __init__(self, device: torch.device):
        self.cuda = torch.device(device).type == "cuda"

    def start(self):
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        return time.perf_counter()

    def stop(self, start) -> float:
        if self.cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            end.synchronize()
            return start.elapsed_time(end)
        return (time.perf_counter() - start) * 1e3


def summary(values: Iterable[float]) -> dict:
    """n, p50, p99, max and mean of ``values`` (empty: n=0 and None)."""
    v = np.asarray(list(values), dtype=np.float64)
    if not len(v):
        return {"n": 0, "p50": None, "p99": None, "max": None, "mean": None}
    p50, p99 = np.percentile(v, [50, 99])
    return {"n": int(len(v)), "p50": float(p50), "p99": float(p99), "max": float(v.max()), "mean": float(v.mean())}


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """‖out − ref‖ / ‖ref‖ in float64 (NaN anywhere gives NaN, which fails any bound)."""
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    return float(torch.linalg.vector_norm(out - ref) / torch.linalg.vector_norm(ref))


# --- output -------------------------------------------------------------------------------------
def table(headers: Sequence[str], rows: Iterable[Sequence]) -> str:
    """A Markdown table (pastes into docs as it is)."""
    cells = [[str(h) for h in headers]] + [["" if c is None else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    return "\n".join([line(cells[0]), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
                     + [line(r) for r in cells[1:]])


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend, or None where matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def save_figure(plt, fig, title: str, path: Path) -> Path:
    """Title, tight layout, PNG at ``path``, figure closed."""
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def save_json(path: Path | str, obj: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, default=str) + "\n")  # str: devices, paths
    print(f"saved {path}")
    return path


def positive_int(value: str) -> int:
    """argparse type: an integer > 0."""
    try:
        out = int(value)
    except ValueError:
        out = 0
    if out <= 0:
        raise argparse.ArgumentTypeError(f"{value!r} is not a positive integer")
    return out


def nonnegative_int(value: str) -> int:
    """argparse type: an integer >= 0."""
    try:
        out = int(value)
    except ValueError:
        out = -1
    if out < 0:
        raise argparse.ArgumentTypeError(f"{value!r} is not an integer >= 0")
    return out


def device_arg(value: str) -> torch.device:
    """argparse type: a torch device (cpu, cuda, cuda:1)."""
    try:
        return torch.device(value)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a device (cpu, cuda, cuda:1)") from None


def cuda_device(value: str) -> torch.device:
    """argparse type: a CUDA device (cuda, cuda:1)."""
    device = device_arg(value)
    if device.type != "cuda":
        raise argparse.ArgumentTypeError(f"{value!r} is not a CUDA device (cuda, cuda:1)")
    return device


def csv_ints(value: str) -> list[int]:
    """argparse type: ``"1,2,4"`` -> ``[1, 2, 4]``, every item a positive integer."""
    try:
        out = [int(x) for x in value.split(",") if x.strip()]
    except ValueError:
        out = []
    if not out or any(x <= 0 for x in out):
        raise argparse.ArgumentTypeError(f"{value!r} is not a comma-separated list of positive integers")
    return out


def size_arg(value: str) -> int:
    """argparse type: one positive size such as ``2GiB``."""
    sizes = csv_sizes(value)
    if len(sizes) != 1:
        raise argparse.ArgumentTypeError(f"{value!r} is not one size such as 2GiB")
    return sizes[0]


def csv_sizes(value: str) -> list[int]:
    """argparse type: ``"2MiB,8MiB"`` -> bytes, every item a positive size."""
    from pyvattn.units import parse_size

    try:
        out = [parse_size(x.strip(), "size") for x in value.split(",") if x.strip()]
    except ValueError:
        out = []
    if not out or any(x <= 0 for x in out):
        raise argparse.ArgumentTypeError(f"{value!r} is not a comma-separated list of sizes such as 2MiB,8MiB")
    return out


# --- raw CUDA VMM calls -------------------------------------------------------------------------
class VmmDriver:
    """The CUDA VMM calls on one device's primary context, through pyvattn's cffi declarations
    (``pyvattn._ffi.cuda``), for benchmarks that time the driver itself.

    ``lib``, ``prop`` (pinned device memory), ``access`` (read/write for the device) and
    ``location`` are what a timed loop passes straight to ``lib.cuXxx``; the methods are the
    untimed setup around it, one driver call each, raising ``CudaError`` with the status name.
    Threads call ``bind()`` first: a new thread has no current context.
    """

    def __init__(self, ordinal: int = 0):
        from pyvattn._ffi import cuda

        self.cuda = cuda
        cuda.init()
        self.primary = cuda.PrimaryContext(ordinal)
        self.lib = cuda.lib()
        dev = self.primary.dev
        self.prop = cuda.allocation_prop(dev)
        self.access = cuda.access_desc(dev)
        self.location = cuda.ffi.new("CUmemLocation *")
        self.location.type = cuda.CU_MEM_LOCATION_TYPE_DEVICE
        self.location.id = dev
        self.bind()
        self.granularity = cuda.allocation_granularity(dev)
        self.device_name = cuda.device_name(dev)

    def bind(self) -> None:
        """Make the primary context current on the calling thread."""
        self.check("cuCtxSetCurrent", self.lib.cuCtxSetCurrent(self.primary.ctx))

    def check(self, call: str, status: int) -> None:
        self.cuda.check(call, status)

    def reserve(self, nbytes: int, align: int) -> int:
        out = self.cuda.ffi.new("CUdeviceptr *")
        self.check("cuMemAddressReserve", self.lib.cuMemAddressReserve(out, nbytes, align, 0, 0))
        return int(out[0])

    def free(self, va: int, nbytes: int) -> None:
        self.check("cuMemAddressFree", self.lib.cuMemAddressFree(va, nbytes))

    def create(self, size: int) -> int:
        out = self.cuda.ffi.new("CUmemGenericAllocationHandle *")
        self.check("cuMemCreate", self.lib.cuMemCreate(out, size, self.prop, 0))
        return int(out[0])

    def release(self, handle: int) -> None:
        self.check("cuMemRelease", self.lib.cuMemRelease(handle))

    def map(self, va: int, size: int, handle: int) -> None:
        self.check("cuMemMap", self.lib.cuMemMap(va, size, 0, handle, 0))

    def set_access(self, va: int, size: int) -> None:
        self.check("cuMemSetAccess", self.lib.cuMemSetAccess(va, size, self.access, 1))

    def unmap(self, va: int, size: int) -> None:
        self.check("cuMemUnmap", self.lib.cuMemUnmap(va, size))

    def get_access(self, va: int) -> int:
        """The access flags this device has at ``va`` (0: none, 3: read/write)."""
        out = self.cuda.ffi.new("unsigned long long *")
        self.check("cuMemGetAccess", self.lib.cuMemGetAccess(out, self.location, va))
        return int(out[0])

    def free_memory(self) -> int:
        return self.primary.mem_info()[0]

    def synchronize(self) -> None:
        self.check("cuCtxSynchronize", self.lib.cuCtxSynchronize())

    def close(self) -> None:
        self.primary.release()

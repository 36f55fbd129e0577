#!/usr/bin/env python3
"""Ioctl-level test of the pyvattn-patched nvidia-uvm module, for a machine with a GPU and the
patched module loaded (`sudo make install-driver`, see docs/uvm64k.md).

Every KVC ioctl is called with valid input and with each kind of bad input; each answer is
compared with the NV_STATUS the design memo's validation table (section 4.6) prescribes. Data
checks go through torch on the mapped VA: fresh pages read as zeros, writes read back, a remap
shows the new page's data as soon as the ioctl returns. Lifetime checks run in child processes:
a process that exits (or is killed) with live mappings gives all its GPU memory back, and a
second process cannot use the first one's handles.

    python scripts/uvm_ioctl_test.py [--device 0] [--json] [-k substring]

Prints a PASS/FAIL table (or JSON with --json); exit status 0 if every case passed, 1 if any
failed, 2 if the machine cannot run the test (no GPU, stock module, ABI mismatch).
"""

from __future__ import annotations

import argparse
import errno as _errno
import json
import os
import signal
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from pyvattn._ffi import libc  # noqa: E402

K64 = 64 << 10
MiB = 1 << 20


# --- one process's view of the module ---------------------------------------------------------
class Uvm:
    """CUDA's UVM fd for one GPU, and thin helpers over each ioctl. ``call`` never raises: it
    returns the answer as a status name ("NV_OK", "NV_ERR_...", or an errno name)."""

    def __init__(self, ordinal: int):
        from pyvattn._ffi import cuda, uvm
        from pyvattn.backends.uvm import UvmBackend, gpu_uuid

        self.abi, self.cuda = uvm, cuda
        self.device = torch.device("cuda", ordinal)
        torch.zeros(1, device=self.device)  # CUDA context: the GPU and its VA space are registered
        self.uuid = gpu_uuid(ordinal)
        self.backend = UvmBackend(self.device, K64)  # finds the fd exactly as the backend does
        self.fd = self.backend.fd
        self.max_batch = self.backend.max_batch
        self.keep: list = []  # cffi buffers that must outlive the calls made with them
        self.ranges: dict[int, int] = {}

    # raw calls
    def call(self, name: str, fd: int | None = None, **fields) -> tuple[str, object]:
        uvm = self.abi
        p = self._params(name, fields)
        err, status = uvm.raw_ioctl(self.fd if fd is None else fd, uvm.IOCTLS[name], p)
        if err:
            return _errno.errorcode.get(err, f"E{err}"), p
        return uvm.status_name(status), p

    def _params(self, name: str, fields: dict):
        uvm = self.abi
        version = fields.pop("version", None)
        pad0 = fields.pop("pad0", None)
        p = uvm.params(name, **fields)
        if version is not None:
            p.version = version
        if pad0 is not None:
            p.pad0 = pad0
        return p

    def ok(self, name: str, **fields):
        status, p = self.call(name, **fields)
        if status != "NV_OK":
            raise AssertionError(f"{name} setup call failed: {status}")
        return p

    def u64s(self, values) -> int:
        arr = self.abi.ffi.new("NvU64[]", [int(v) for v in values] or [0])
        self.keep.append(arr)
        return int(self.abi.ffi.cast("uintptr_t", arr))

    def entries(self, pairs) -> int:
        uvm = self.abi
        arr = uvm.ffi.new(f"{uvm.SCATTER_ENTRY}[]", max(len(pairs), 1))
        va_col, h_col = uvm.SCATTER_FIELDS
        names = [f for f, _ in uvm.ffi.typeof(uvm.SCATTER_ENTRY).fields]
        for i, (va, h) in enumerate(pairs):
            setattr(arr[i], names[va_col], va)
            setattr(arr[i], names[h_col], h)
        self.keep.append(arr)
        return int(uvm.ffi.cast("uintptr_t", arr))

    # helpers that must succeed
    def alloc(self, n: int, flags: int = 0) -> list[int]:
        out = self.abi.ffi.new("NvU64[]", n)
        self.keep.append(out)
        self.ok("UVM_KVC_ALLOC", flags=flags, gpuUuid=self.uuid, pageSize=K64, count=n,
                handlesPtr=int(self.abi.ffi.cast("uintptr_t", out)))
        return list(out)

    def free(self, handles) -> None:
        self.ok("UVM_KVC_FREE", count=len(handles), handlesPtr=self.u64s(handles))

    def prot_none(self, nbytes: int) -> int:
        """A 2 MiB-aligned PROT_NONE reservation that UVM knows nothing about."""
        raw = libc.mmap(0, nbytes + 2 * MiB, libc.PROT_NONE,
                        libc.MAP_PRIVATE | libc.MAP_ANONYMOUS | libc.MAP_NORESERVE)
        return -(-raw // (2 * MiB)) * (2 * MiB)

    def range(self, nbytes: int) -> int:
        nbytes = -(-nbytes // (2 * MiB)) * (2 * MiB)  # KVC ranges are whole 2 MiB blocks
        base = self.prot_none(nbytes)
        self.ok("UVM_KVC_CREATE_RANGE", base=base, length=nbytes)
        self.ranges[base] = nbytes
        return base

    def drop_range(self, base: int) -> None:
        self.ok("UVM_FREE", base=base, length=self.ranges.pop(base))

    def map(self, base: int, handles, flags: int = 0) -> str:
        return self.call("UVM_KVC_MAP", flags=flags, gpuUuid=self.uuid, base=base,
                         count=len(handles), handlesPtr=self.u64s(handles))[0]

    def unmap(self, base: int, length: int) -> str:
        return self.call("UVM_KVC_UNMAP", gpuUuid=self.uuid, base=base, length=length)[0]

    def view(self, base: int, nbytes: int, dtype=torch.int32) -> torch.Tensor:
        return self.backend.tensor(base, nbytes).view(dtype)

    def unreadable(self) -> int:
        """An address the kernel cannot copy from or to (a PROT_NONE page)."""
        return self.prot_none(2 * MiB)

    def readonly(self) -> int:
        addr = libc.mmap(0, libc.PAGE_SIZE, libc.PROT_READ, libc.MAP_PRIVATE | libc.MAP_ANONYMOUS)
        return addr

    def flag(self, name: str) -> int:
        return getattr(self.abi, name, 0)

    def has(self, ioctl: str) -> bool:
        return ioctl in self.abi.IOCTLS


# --- the case runner ---------------------------------------------------------------------------
@dataclass
class Result:
    case: str
    expected: str = ""
    got: str = ""
    passed: bool = True
    detail: str = ""
    checks: list = field(default_factory=list)


class Check:
    """Collects the comparisons one case makes; the case passes if all of them hold."""

    def __init__(self, result: Result):
        self.r = result

    def __call__(self, what: str, got, expected) -> bool:
        good = got == expected
        self.r.checks.append({"what": what, "expected": str(expected), "got": str(got), "passed": good})
        if not good and self.r.passed:
            self.r.passed, self.r.expected, self.r.got, self.r.detail = False, str(expected), str(got), what
        elif self.r.passed:
            self.r.expected, self.r.got, self.r.detail = str(expected), str(got), what
        return good

    def true(self, what: str, cond: bool) -> bool:
        return self(what, bool(cond), True)


CASES: list = []


def case(name: str, needs: str | None = None):
    def register(fn):
        CASES.append((name, fn, needs))
        return fn
    return register


BAD_FLAG = 1 << 31
WRONG_UUID = bytes.fromhex("deadbeef" * 4)
BAD_INPUTS = {  # field overrides -> expected status (memo 4.6)
    "version": ({"version": 0xBAD}, "NV_ERR_NOT_SUPPORTED"),
    "flags": ({"flags": BAD_FLAG}, "NV_ERR_INVALID_FLAGS"),
    "reserved": ({"reserved": 1}, "NV_ERR_INVALID_ARGUMENT"),
    "pad0": ({"pad0": 1}, "NV_ERR_INVALID_ARGUMENT"),
}


def _reserved_value(u: Uvm, name: str):
    """``reserved`` may be an NvU64 or an array of them."""
    t = u.abi.ffi.typeof(f"{name}_PARAMS")
    f = dict(t.fields).get("reserved")
    if f is None:
        return None
    return [1] + [0] * (f.type.length - 1) if f.type.kind == "array" else 1


def common_bad_inputs(u: Uvm, check: Check, name: str, valid: dict) -> None:
    """version / flags / reserved / pad0 checks, applied to an otherwise valid call."""
    for key, (override, want) in BAD_INPUTS.items():
        fields = {**valid, **override}
        if key == "reserved":
            value = _reserved_value(u, name)
            if value is None:
                continue
            fields["reserved"] = value
        if key == "flags":  # unknown bits only: keep the valid call's own flags
            fields["flags"] = valid.get("flags", 0) | BAD_FLAG
        status, p = u.call(name, **fields)
        check(f"{name} with bad {key}", status, want)


# QUERY ---------------------------------------------------------------------------------------
@case("query: va_space fd answers magic, fd type, GPU state, batch")
def _(u: Uvm, check: Check):
    status, p = u.call("UVM_KVC_QUERY", gpuUuid=u.uuid)
    check("status", status, "NV_OK")
    check("magic", hex(p.magic), hex(u.abi.UVM_KVC_MAGIC))
    check("fdType", int(p.fdType), u.abi.UVM_KVC_FD_VA_SPACE)
    check.true("gpuState has registered+VA space+supported",
               p.gpuState & u.abi.UVM_KVC_GPU_HAS_VA_SPACE and p.gpuState & u.abi.UVM_KVC_GPU_SUPPORTED)
    check.true("maxBatch >= 1", p.maxBatch >= 1)
    check.true("64K in supportedPageSizes", p.supportedPageSizes & K64)
    check("supportedPageSizes", hex(p.supportedPageSizes), hex(u.abi.UVM_KVC_SUPPORTED_PAGE_SIZES))


@case("query: limits and usage: caps, and bytes held growing by whole 2 MiB roots")
def _(u: Uvm, check: Check):
    p = u.ok("UVM_KVC_QUERY", gpuUuid=u.uuid)
    for param, field in (("uvm_kvc_max_mb_per_process", "processLimitBytes"),
                         ("uvm_kvc_max_meta_mb_per_process", "metaLimitBytes")):
        value = _module_param(param)
        if value is not None:
            check(f"{field} is the module parameter {param}", int(getattr(p, field)), value << 20)
    check.true("gpuLimitBytes is set (uvm_kvc_max_gpu_percent of the GPU)", int(p.gpuLimitBytes) > 0)
    check("maxMappingsPerPage", int(p.maxMappingsPerPage), u.abi.UVM_KVC_MAX_MAPPINGS_PER_PAGE)
    check.true("this process owns its va_space", p.callerState & u.abi.UVM_KVC_CALLER_OWNS_VA_SPACE)
    before, proc_before, gpu_before = int(p.fdBytes), int(p.processBytes), int(p.gpuBytes)
    hs = u.alloc(33)  # 33 x 64 KiB: at least one more 2 MiB root
    q = u.ok("UVM_KVC_QUERY", gpuUuid=u.uuid)
    after = int(q.fdBytes)
    check.true(f"fdBytes grew by whole roots ({before} -> {after})",
               after > before and (after - before) % (2 * MiB) == 0 and after - before <= 4 * MiB)
    check("processBytes grew as much", int(q.processBytes) - proc_before, after - before)
    check.true("gpuBytes grew at least as much", int(q.gpuBytes) - gpu_before >= after - before)
    check.true("metaBytes counts the bookkeeping", int(q.metaBytes) > 0)
    u.free(hs)
    check("fdBytes back after FREE", int(u.ok("UVM_KVC_QUERY", gpuUuid=u.uuid).fdBytes), before)
    check("no GPU: fdBytes 0", int(u.ok("UVM_KVC_QUERY", gpuUuid=WRONG_UUID).fdBytes), 0)
    usage = _read_param_text("uvm_kvc_usage")
    if usage is not None:
        check.true("uvm_kvc_usage lists this process", f"pid {os.getpid()} " in usage)


def _read_param_text(name: str) -> str | None:
    try:
        with open(f"/sys/module/nvidia_uvm/parameters/{name}") as f:
            return f.read()
    except OSError:
        return None


def _write_param(name: str, value: str) -> bool:
    """Set a module parameter (root only); False where that is not possible."""
    try:
        with open(f"/sys/module/nvidia_uvm/parameters/{name}", "w") as f:
            f.write(value)
        return True
    except OSError:
        return False


def _module_param(name: str) -> int | None:
    try:
        with open(f"/sys/module/nvidia_uvm/parameters/{name}") as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None


@case("query: other /dev/nvidia-uvm fds are not va_space fds with this GPU")
def _(u: Uvm, check: Check):
    from pyvattn.backends.uvm import uvm_fds

    for fd in uvm_fds():
        if fd == u.fd:
            continue
        status, p = u.call("UVM_KVC_QUERY", fd=fd, gpuUuid=u.uuid)
        check(f"fd {fd} status", status, "NV_OK")
        check.true(f"fd {fd} is not a second va_space with the GPU VA space",
                   p.fdType != u.abi.UVM_KVC_FD_VA_SPACE or not p.gpuState & u.abi.UVM_KVC_GPU_HAS_VA_SPACE)
    fresh = os.open("/dev/nvidia-uvm", os.O_RDWR)
    try:
        status, p = u.call("UVM_KVC_QUERY", fd=fresh, gpuUuid=u.uuid)
        check("uninitialised fd answers QUERY", status, "NV_OK")
        check("uninitialised fd type", int(p.fdType), u.abi.UVM_KVC_FD_UNINITIALIZED)
    finally:
        os.close(fresh)


@case("query: unknown GPU reports no state")
def _(u: Uvm, check: Check):
    status, p = u.call("UVM_KVC_QUERY", gpuUuid=WRONG_UUID)
    check("status", status, "NV_OK")
    check("gpuState", int(p.gpuState), 0)


@case("query: bad version / flags / pad0")
def _(u: Uvm, check: Check):
    common_bad_inputs(u, check, "UVM_KVC_QUERY", {"gpuUuid": u.uuid})


# ALLOC ---------------------------------------------------------------------------------------
@case("alloc: 1 and maxBatch pages, distinct opaque handles")
def _(u: Uvm, check: Check):
    one = u.alloc(1)
    many = u.alloc(u.max_batch)
    check.true("handles distinct and non-zero", len(set(one + many)) == 1 + u.max_batch and 0 not in one + many)
    check.true("handles are not 64K-aligned physical addresses", any(h % K64 for h in one + many))
    u.free(one)
    for i in range(0, len(many), u.max_batch):
        u.free(many[i:i + u.max_batch])
    check("freed", "ok", "ok")


@case("alloc: bad inputs")
def _(u: Uvm, check: Check):
    out = u.u64s([0] * 4)
    valid = {"gpuUuid": u.uuid, "pageSize": K64, "count": 1, "handlesPtr": out}
    common_bad_inputs(u, check, "UVM_KVC_ALLOC", valid)
    for size in (4096, 192 << 10, 512 << 10, 2 * MiB, 0):
        check(f"pageSize {size}", u.call("UVM_KVC_ALLOC", **{**valid, "pageSize": size})[0],
              "NV_ERR_INVALID_ARGUMENT")
    check("count 0", u.call("UVM_KVC_ALLOC", **{**valid, "count": 0})[0], "NV_ERR_INVALID_ARGUMENT")
    big = u.u64s([0] * (u.max_batch + 1))
    check("count maxBatch+1", u.call("UVM_KVC_ALLOC", **{**valid, "count": u.max_batch + 1,
                                                         "handlesPtr": big})[0], "NV_ERR_INVALID_LIMIT")
    check("unknown GPU", u.call("UVM_KVC_ALLOC", **{**valid, "gpuUuid": WRONG_UUID})[0],
          "NV_ERR_INVALID_DEVICE")
    check("unwritable handlesPtr (PROT_NONE)",
          u.call("UVM_KVC_ALLOC", **{**valid, "handlesPtr": u.unreadable()})[0], "NV_ERR_INVALID_ADDRESS")
    check("unwritable handlesPtr (read-only)",
          u.call("UVM_KVC_ALLOC", **{**valid, "handlesPtr": u.readonly()})[0], "NV_ERR_INVALID_ADDRESS")
    fresh = os.open("/dev/nvidia-uvm", os.O_RDWR)
    try:
        check("uninitialised fd", u.call("UVM_KVC_ALLOC", fd=fresh, **valid)[0], "NV_ERR_ILLEGAL_ACTION")
    finally:
        os.close(fresh)


@case("alloc/map 128K and 256K handles: back to back, scattered, data")
def _(u: Uvm, check: Check):
    supported = int(u.ok("UVM_KVC_QUERY", gpuUuid=u.uuid).supportedPageSizes)
    for size in (128 << 10, 256 << 10):
        out = u.u64s([0] * 4)
        status, _ = u.call("UVM_KVC_ALLOC", gpuUuid=u.uuid, pageSize=size, count=4, handlesPtr=out)
        if not supported & size:
            check(f"{size >> 10}K not reported: ALLOC refuses it", status, "NV_ERR_INVALID_ARGUMENT")
            continue
        check(f"alloc 4 x {size >> 10}K", status, "NV_OK")
        hs = list(u.abi.ffi.cast("NvU64 *", out)[0:4])
        base = u.range(4 * MiB)
        check(f"{size >> 10}K: map back to back", u.map(base, hs), "NV_OK")
        v = u.view(base, 4 * size)
        check(f"{size >> 10}K: fresh pages read as zeros", int(v.count_nonzero().item()), 0)
        for i in range(4):
            u.view(base + i * size, size).fill_(i + 1)
        torch.cuda.synchronize(u.device)
        check(f"{size >> 10}K: NO_REPLACE sees the whole handle mapped",
              u.map(base + size - K64, hs[:1], flags=u.flag("UVM_KVC_MAP_FLAGS_NO_REPLACE")),
              "NV_ERR_UVM_ADDRESS_IN_USE")
        check(f"{size >> 10}K: unmap", u.unmap(base, 4 * size), "NV_OK")
        spots = [2 * MiB + i * 2 * size for i in range(4)]
        status, _ = u.call("UVM_KVC_MAP_SCATTER", gpuUuid=u.uuid, count=4,
                           entriesPtr=u.entries([(base + o, h) for o, h in zip(spots, hs[::-1])]))
        check(f"{size >> 10}K: scatter", status, "NV_OK")
        check.true(f"{size >> 10}K: data moved with each handle",
                   all(int((u.view(base + o, size) == 4 - i).all().item()) for i, o in enumerate(spots)))
        check(f"{size >> 10}K: straddling the range end",
              u.map(base + 4 * MiB - K64, hs[:1], flags=u.flag("UVM_KVC_MAP_FLAGS_NO_REPLACE")),
              "NV_ERR_INVALID_ADDRESS")
        u.unmap(base, 4 * MiB)
        u.free(hs)
        u.drop_range(base)


class Skip(Exception):
    """A case that cannot run on this machine (reason in the message)."""


@case("kernel self-test UVM_KVC_TEST_SANITY: PTE readback, forced non-zero roots, id reuse (needs uvm_enable_builtin_tests=1)")
def _(u: Uvm, check: Check):
    base = u.prot_none(4 * MiB)
    status, _ = u.call("UVM_KVC_TEST_SANITY", gpuUuid=u.uuid, base=base, length=4 * MiB,
                       iterations=16, injectFailAfter=0)
    if status in ("EINVAL", "ENOSYS"):
        raise Skip(f"builtin tests are off ({status}): modprobe nvidia-uvm uvm_enable_builtin_tests=1")
    check("self-test", status, "NV_OK")
    check("injectFailAfter is reserved (must be 0)", u.call(
        "UVM_KVC_TEST_SANITY", gpuUuid=u.uuid, base=base, length=4 * MiB, iterations=4,
        injectFailAfter=3)[0], "NV_ERR_INVALID_ARGUMENT")
    check("iterations are capped at 1000", u.call(
        "UVM_KVC_TEST_SANITY", gpuUuid=u.uuid, base=base, length=4 * MiB, iterations=1001,
        injectFailAfter=0)[0], "NV_ERR_INVALID_LIMIT")


# FREE ----------------------------------------------------------------------------------------
@case("free: valid, double, duplicate, unknown, stale")
def _(u: Uvm, check: Check):
    a, b = u.alloc(2)
    check("duplicate in one call", u.call("UVM_KVC_FREE", count=2, handlesPtr=u.u64s([a, a]))[0],
          "NV_ERR_INVALID_ARGUMENT")
    check("unknown handle next to a valid one frees nothing",
          u.call("UVM_KVC_FREE", count=2, handlesPtr=u.u64s([a, 0x7777_0000_1234]))[0],
          "NV_ERR_INVALID_OBJECT_HANDLE")
    check("valid", u.call("UVM_KVC_FREE", count=2, handlesPtr=u.u64s([a, b]))[0], "NV_OK")
    check("double free", u.call("UVM_KVC_FREE", count=1, handlesPtr=u.u64s([a]))[0],
          "NV_ERR_INVALID_OBJECT_HANDLE")
    check("handle 0", u.call("UVM_KVC_FREE", count=1, handlesPtr=u.u64s([0]))[0],
          "NV_ERR_INVALID_OBJECT_HANDLE")
    reused = u.alloc(64)  # ids are recycled: the generation must still tell them apart
    check("stale handle after reuse", u.call("UVM_KVC_FREE", count=1, handlesPtr=u.u64s([b]))[0],
          "NV_ERR_INVALID_OBJECT_HANDLE")
    u.free(reused)


@case("generation: a slot freed and allocated again keeps its id; the old handle is refused")
def _(u: Uvm, check: Check):
    keep = u.alloc(31)  # most of a root: the next pages come from it, its id stays
    (old,) = u.alloc(1)
    u.free([old])
    (new,) = u.alloc(1)
    reused = (new & 0xFFFFFFFF) == (old & 0xFFFFFFFF)
    check.true(f"id reused ({'yes' if reused else 'no: another partial root served it'}), new generation",
               new != old)
    base = u.range(2 * MiB)
    check("MAP with the old handle", u.map(base, [old]), "NV_ERR_INVALID_OBJECT_HANDLE")
    check("FREE with the old handle", u.call("UVM_KVC_FREE", count=1, handlesPtr=u.u64s([old]))[0],
          "NV_ERR_INVALID_OBJECT_HANDLE")
    check("the new handle maps", u.map(base, [new]), "NV_OK")
    u.unmap(base, K64)
    u.free(keep + [new])
    u.drop_range(base)


@case("free: bad inputs")
def _(u: Uvm, check: Check):
    (h,) = u.alloc(1)
    valid = {"count": 1, "handlesPtr": u.u64s([h])}
    common_bad_inputs(u, check, "UVM_KVC_FREE", valid)
    check("count 0", u.call("UVM_KVC_FREE", count=0, handlesPtr=u.u64s([h]))[0], "NV_ERR_INVALID_ARGUMENT")
    check("count maxBatch+1", u.call("UVM_KVC_FREE", count=u.max_batch + 1,
                                     handlesPtr=u.u64s([h] * (u.max_batch + 1)))[0], "NV_ERR_INVALID_LIMIT")
    check("unreadable handlesPtr", u.call("UVM_KVC_FREE", count=1, handlesPtr=u.unreadable())[0],
          "NV_ERR_INVALID_ADDRESS")
    check("the handle survived every refused call", u.call("UVM_KVC_FREE", **valid)[0], "NV_OK")


@case("free: while mapped (FAIL_IF_MAPPED refuses; plain free defers until unmap)")
def _(u: Uvm, check: Check):
    base = u.range(2 * MiB)
    (h,) = u.alloc(1)
    check("map", u.map(base, [h]), "NV_OK")
    u.view(base, K64).fill_(0x5A5A5A5A)
    fim = u.flag("UVM_KVC_FREE_FLAGS_FAIL_IF_MAPPED")
    if fim:
        check("FAIL_IF_MAPPED", u.call("UVM_KVC_FREE", flags=fim, count=1, handlesPtr=u.u64s([h]))[0],
              "NV_ERR_IN_USE")
    check("plain free while mapped", u.call("UVM_KVC_FREE", count=1, handlesPtr=u.u64s([h]))[0], "NV_OK")
    check("data still readable through the mapping",
          int((u.view(base, K64) == 0x5A5A5A5A).all().item()), 1)
    check("handle is gone", u.map(base + K64, [h]), "NV_ERR_INVALID_OBJECT_HANDLE")
    check("unmap", u.unmap(base, K64), "NV_OK")
    u.drop_range(base)


# CREATE_RANGE --------------------------------------------------------------------------------
@case("create_range: valid, misaligned, empty, overlapping, over cudaMalloc memory")
def _(u: Uvm, check: Check):
    base = u.prot_none(4 * MiB)
    valid = {"base": base, "length": 2 * MiB}
    common_bad_inputs(u, check, "UVM_KVC_CREATE_RANGE", valid)
    check("misaligned base", u.call("UVM_KVC_CREATE_RANGE", base=base + 4096, length=K64)[0],
          "NV_ERR_INVALID_ADDRESS")
    check("misaligned length", u.call("UVM_KVC_CREATE_RANGE", base=base, length=K64 + 4096)[0],
          "NV_ERR_INVALID_ADDRESS")
    check("64K-aligned but not whole 2 MiB", u.call("UVM_KVC_CREATE_RANGE", base=base, length=K64)[0],
          "NV_ERR_INVALID_ADDRESS")
    check("zero length", u.call("UVM_KVC_CREATE_RANGE", base=base, length=0)[0], "NV_ERR_INVALID_ADDRESS")
    check("base + length overflows", u.call("UVM_KVC_CREATE_RANGE", base=(1 << 64) - K64, length=2 * K64)[0],
          "NV_ERR_INVALID_ADDRESS")
    check("valid", u.call("UVM_KVC_CREATE_RANGE", **valid)[0], "NV_OK")
    u.ranges[base] = 2 * MiB
    check("overlapping", u.call("UVM_KVC_CREATE_RANGE", base=base, length=4 * MiB)[0],
          "NV_ERR_UVM_ADDRESS_IN_USE")

    t = torch.empty(8 * MiB, dtype=torch.uint8, device=u.device)
    inside = -(-t.data_ptr() // (2 * MiB)) * (2 * MiB)
    # Whether UVM knows cudaMalloc's VA at all is closed CUDA behaviour (memo 4.10): if this
    # succeeds, a KVC range could shadow CUDA memory, which the patch should then refuse.
    status = u.call("UVM_KVC_CREATE_RANGE", base=inside, length=2 * MiB)[0]
    if status == "NV_OK":
        u.call("UVM_FREE", base=inside, length=2 * MiB)
    check("over a cudaMalloc range", status, "NV_ERR_UVM_ADDRESS_IN_USE")
    u.drop_range(base)
    del t


# MAP -----------------------------------------------------------------------------------------
@case("map: valid run, fresh pages read as zero, data round trip")
def _(u: Uvm, check: Check):
    base = u.range(4 * MiB)
    hs = u.alloc(32, flags=u.flag("UVM_KVC_ALLOC_FLAGS_ZERO"))
    status, p = u.call("UVM_KVC_MAP", gpuUuid=u.uuid, base=base, count=32, handlesPtr=u.u64s(hs))
    check("map 32 pages", status, "NV_OK")
    check("countDone", int(p.countDone), 32)
    v = u.view(base, 32 * K64)
    check("fresh pages read as zeros", int(v.count_nonzero().item()), 0)
    v.copy_(torch.arange(v.numel(), dtype=torch.int32, device=u.device))
    torch.cuda.synchronize(u.device)
    check("write/read back", int((v == torch.arange(v.numel(), dtype=torch.int32, device=u.device)).all().item()), 1)
    check("unmap", u.unmap(base, 32 * K64), "NV_OK")
    check("remap same handles elsewhere keeps data", u.map(base + 2 * MiB, hs), "NV_OK")
    w = u.view(base + 2 * MiB, 32 * K64)
    check("data moved with the pages",
          int((w == torch.arange(w.numel(), dtype=torch.int32, device=u.device)).all().item()), 1)
    u.unmap(base + 2 * MiB, 32 * K64)
    u.free(hs)
    u.drop_range(base)


@case("map: replace shows the new page at once; NO_REPLACE refuses")
def _(u: Uvm, check: Check):
    base = u.range(2 * MiB)
    a, b = u.alloc(2)
    check("map a", u.map(base, [a]), "NV_OK")
    check("map b", u.map(base + K64, [b]), "NV_OK")
    u.view(base, K64).fill_(1)
    u.view(base + K64, K64).fill_(2)
    torch.cuda.synchronize(u.device)
    check("unmap b", u.unmap(base + K64, K64), "NV_OK")
    nr = u.flag("UVM_KVC_MAP_FLAGS_NO_REPLACE")
    check("NO_REPLACE over a mapping", u.map(base, [b], flags=nr), "NV_ERR_UVM_ADDRESS_IN_USE")
    check("page a still there", int((u.view(base, K64) == 1).all().item()), 1)
    check("replace a by b", u.map(base, [b]), "NV_OK")
    check("new page visible immediately", int((u.view(base, K64) == 2).all().item()), 1)
    check("a mappable again (was unmapped by the replace)", u.map(base + K64, [a], flags=nr), "NV_OK")
    check("a kept its data", int((u.view(base + K64, K64) == 1).all().item()), 1)
    u.unmap(base, 2 * K64)
    u.free([a, b])
    u.drop_range(base)


@case("map: bad inputs")
def _(u: Uvm, check: Check):
    base = u.range(2 * MiB)
    hs = u.alloc(2)
    valid = {"gpuUuid": u.uuid, "base": base, "count": 1, "handlesPtr": u.u64s(hs[:1])}
    common_bad_inputs(u, check, "UVM_KVC_MAP", valid)
    m = lambda **kw: u.call("UVM_KVC_MAP", **{**valid, **kw})[0]  # noqa: E731
    check("misaligned base", m(base=base + 4096), "NV_ERR_INVALID_ADDRESS")
    check("count 0", m(count=0), "NV_ERR_INVALID_ARGUMENT")
    check("count maxBatch+1", m(count=u.max_batch + 1, handlesPtr=u.u64s(hs[:1] * (u.max_batch + 1))),
          "NV_ERR_INVALID_LIMIT")
    check("straddles the range end", m(base=base + 2 * MiB - K64, count=2, handlesPtr=u.u64s(hs)),
          "NV_ERR_INVALID_ADDRESS")
    check("outside any KVC range", m(base=u.prot_none(2 * MiB)), "NV_ERR_INVALID_ADDRESS")
    t = torch.empty(8 * MiB, dtype=torch.uint8, device=u.device)
    check("inside a cudaMalloc range", m(base=-(-t.data_ptr() // K64) * K64), "NV_ERR_INVALID_ADDRESS")
    managed = _managed_alloc(u, 4 * MiB)
    check.true("cuMemAllocManaged for the next check", managed)
    if managed:
        check("inside a cudaMallocManaged range", m(base=-(-managed // K64) * K64), "NV_ERR_INVALID_ADDRESS")
        _managed_free(u, managed)
    check("unknown GPU", m(gpuUuid=WRONG_UUID), "NV_ERR_INVALID_DEVICE")
    check("unknown handle", m(handlesPtr=u.u64s([0x7777_0000_1234])), "NV_ERR_INVALID_OBJECT_HANDLE")
    check("unreadable handlesPtr", m(handlesPtr=u.unreadable()), "NV_ERR_INVALID_ADDRESS")
    (stale,) = u.alloc(1)
    u.free([stale])
    check("freed handle", m(handlesPtr=u.u64s([stale])), "NV_ERR_INVALID_OBJECT_HANDLE")
    check("nothing was mapped by refused calls", m(flags=u.flag("UVM_KVC_MAP_FLAGS_NO_REPLACE")), "NV_OK")
    u.unmap(base, K64)
    u.free(hs)
    u.drop_range(base)
    del t


@case("map_scatter: valid, all-or-nothing, bad inputs", needs="UVM_KVC_MAP_SCATTER")
def _(u: Uvm, check: Check):
    base = u.range(4 * MiB)
    hs = u.alloc(8)
    slots = [0, 5, 17, 31, 32, 40, 50, 63]
    pairs = [(base + s * K64, h) for s, h in zip(slots, hs)]
    valid = {"gpuUuid": u.uuid, "entriesPtr": u.entries(pairs), "count": len(pairs)}
    common_bad_inputs(u, check, "UVM_KVC_MAP_SCATTER", valid)
    s = lambda **kw: u.call("UVM_KVC_MAP_SCATTER", **{**valid, **kw})[0]  # noqa: E731
    check("count 0", s(count=0), "NV_ERR_INVALID_ARGUMENT")
    check("count maxBatch+1", s(count=u.max_batch + 1, entriesPtr=u.entries(pairs * (u.max_batch // 8 + 1))),
          "NV_ERR_INVALID_LIMIT")
    check("unreadable entriesPtr", s(entriesPtr=u.unreadable()), "NV_ERR_INVALID_ADDRESS")
    bad = pairs[:-1] + [(base + 63 * K64 + 4096, hs[-1])]
    check("one misaligned VA", s(entriesPtr=u.entries(bad)), "NV_ERR_INVALID_ADDRESS")
    outside = pairs[:-1] + [(u.prot_none(2 * MiB), hs[-1])]
    check("one VA outside the range", s(entriesPtr=u.entries(outside)), "NV_ERR_INVALID_ADDRESS")
    check("one unknown handle", s(entriesPtr=u.entries(pairs[:-1] + [(pairs[-1][0], 0x7777_0000_1234)])),
          "NV_ERR_INVALID_OBJECT_HANDLE")
    status, p = u.call("UVM_KVC_MAP_SCATTER", **valid)
    check("valid scatter of 8", status, "NV_OK")
    check("countDone", int(p.countDone), 8)
    for i, (va, _) in enumerate(pairs):
        u.view(va, K64).fill_(100 + i)
    torch.cuda.synchronize(u.device)
    check.true("each page holds its own data",
               all(int((u.view(va, K64) == 100 + i).all().item()) for i, (va, _) in enumerate(pairs)))
    check("unmap whole range", u.unmap(base, 4 * MiB), "NV_OK")
    u.free(hs)
    u.drop_range(base)


# UNMAP ---------------------------------------------------------------------------------------
@case("unmap: valid, partial, unmapped, bad inputs")
def _(u: Uvm, check: Check):
    base = u.range(2 * MiB)
    hs = u.alloc(4)
    check("map 4", u.map(base, hs), "NV_OK")
    valid = {"gpuUuid": u.uuid, "base": base, "length": K64}
    common_bad_inputs(u, check, "UVM_KVC_UNMAP", valid)
    un = lambda **kw: u.call("UVM_KVC_UNMAP", **{**valid, **kw})[0]  # noqa: E731
    check("misaligned base", un(base=base + 4096), "NV_ERR_INVALID_ADDRESS")
    check("misaligned length", un(length=4096), "NV_ERR_INVALID_ADDRESS")
    check("zero length", un(length=0), "NV_ERR_INVALID_ADDRESS")
    check("outside any KVC range", un(base=u.prot_none(2 * MiB)), "NV_ERR_INVALID_ADDRESS")
    t = torch.empty(8 * MiB, dtype=torch.uint8, device=u.device)
    check("inside a cudaMalloc range", un(base=-(-t.data_ptr() // K64) * K64), "NV_ERR_INVALID_ADDRESS")
    check("middle two pages (splits the map)", un(base=base + K64, length=2 * K64), "NV_OK")
    check("outer pages still mapped", u.map(base, hs[:1], flags=u.flag("UVM_KVC_MAP_FLAGS_NO_REPLACE")),
          "NV_ERR_UVM_ADDRESS_IN_USE")
    check("middle pages unmapped", u.map(base + K64, hs[1:3], flags=u.flag("UVM_KVC_MAP_FLAGS_NO_REPLACE")),
          "NV_OK")
    check("whole range", un(length=2 * MiB), "NV_OK")
    check("already unmapped (idempotent, like UVM_UNMAP_EXTERNAL)", un(length=2 * MiB), "NV_OK")
    u.free(hs)
    u.drop_range(base)
    del t


@case("uvm_free of a range drops its maps; handles stay valid")
def _(u: Uvm, check: Check):
    base = u.range(2 * MiB)
    hs = u.alloc(4)
    check("map", u.map(base, hs), "NV_OK")
    u.view(base, 4 * K64).fill_(7)
    torch.cuda.synchronize(u.device)
    u.drop_range(base)
    other = u.range(2 * MiB)
    check("handles map again elsewhere", u.map(other, hs), "NV_OK")
    check("data survived", int((u.view(other, 4 * K64) == 7).all().item()), 1)
    u.unmap(other, 4 * K64)
    u.free(hs)
    u.drop_range(other)


@case("dtod copy (cudaMemcpyAsync) into and out of a KVC mapping")
def _(u: Uvm, check: Check):
    base = u.range(2 * MiB)
    hs = u.alloc(16)
    u.map(base, hs)
    src = torch.arange(16 * K64 // 4, dtype=torch.int32, device=u.device)
    v = u.view(base, 16 * K64)
    v.copy_(src)  # same device, contiguous: torch uses cudaMemcpyAsync DtoD
    back = v.clone()
    torch.cuda.synchronize(u.device)
    check("round trip", int(torch.equal(back, src)), 1)
    check("to host", int(torch.equal(v.cpu(), src.cpu())), 1)
    u.unmap(base, 16 * K64)
    u.free(hs)
    u.drop_range(base)


@case("alloc ZERO flag: recycled slots read as zeros (31, and thousands in one call)")
def _(u: Uvm, check: Check):
    zero = u.flag("UVM_KVC_ALLOC_FLAGS_ZERO")
    for n in (32, 3008):  # 3008 = 94 roots: the re-zeroing spans many bounded pushes
        size = n * K64
        base = u.range(size)
        hs = u.alloc(n)
        u.map(base, hs)
        u.view(base, size).fill_(-1)
        torch.cuda.synchronize(u.device)
        u.unmap(base, size)
        # keep one page per 2 MiB root (slots fill roots in order) so the roots stay in the
        # pool and the next ALLOC gets back dirty slots, not fresh roots
        keep = hs[::32]
        recycled = [h for i, h in enumerate(hs) if i % 32]
        u.free(recycled)
        again = u.alloc(len(recycled), flags=zero)
        check(f"{len(recycled)} recycled: map", u.map(base, again), "NV_OK")
        check(f"{len(recycled)} recycled: zeros",
              int(u.view(base, len(recycled) * K64).count_nonzero().item()), 0)
        u.unmap(base, len(recycled) * K64)
        u.free(again + keep)
        u.drop_range(base)


# lifetime, in child processes ------------------------------------------------------------------
CHILD_TIMEOUT = 120


def _child(u: Uvm, mode: str, *args: str) -> subprocess.Popen:
    """This script again, as a separate process with its own CUDA context and UVM fd."""
    cmd = [sys.executable, __file__, "--device", str(u.device.index), f"--child-{mode}", *args]
    return subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def _free_bytes(u: Uvm) -> int:
    return torch.cuda.mem_get_info(u.device)[0]


def _wait_back(u: Uvm, baseline: int, slack: int, seconds: float = 10) -> int:
    deadline = time.time() + seconds
    free = _free_bytes(u)
    while free < baseline - slack and time.time() < deadline:
        time.sleep(0.2)
        free = _free_bytes(u)
    return free


@case("fd close with live mappings returns all GPU memory (exit and SIGKILL)")
def _(u: Uvm, check: Check):
    hold = 512  # MiB of KVC pages the child maps
    for how in ("exit", "kill"):
        baseline = _free_bytes(u)
        proc = _child(u, "hold", str(hold))
        line = proc.stdout.readline().strip()
        if not check(f"{how}: child mapped its pages", line, "ready"):
            proc.kill()
            check(f"{how}: child's stderr", proc.communicate(timeout=CHILD_TIMEOUT)[1][-300:], "")
            return
        during = _free_bytes(u)
        check.true(f"{how}: free memory dropped by >= {hold} MiB while held",
                   baseline - during >= hold * MiB)
        if how == "kill":
            proc.send_signal(signal.SIGKILL)
        else:
            proc.stdin.write("exit\n")
            proc.stdin.flush()
        proc.wait(timeout=CHILD_TIMEOUT)
        after = _wait_back(u, baseline, slack=8 * MiB)
        check.true(f"{how}: free memory back to baseline (within 8 MiB: {(baseline - after) / MiB:.1f} MiB short)",
                   after >= baseline - 8 * MiB)


@case("a second process cannot use this process's handles")
def _(u: Uvm, check: Check):
    hs = u.alloc(4)
    proc = _child(u, "foreign")
    out, err = proc.communicate(json.dumps(hs), timeout=CHILD_TIMEOUT)
    try:
        answers = json.loads(out.strip().splitlines()[-1])
    except (ValueError, IndexError):
        check("child answered", (out + err)[-300:], "json")
        return
    check("child MAP with our handles", answers.get("map"), "NV_ERR_INVALID_OBJECT_HANDLE")
    check("child FREE of our handles", answers.get("free"), "NV_ERR_INVALID_OBJECT_HANDLE")
    check("our handles still ours", u.call("UVM_KVC_FREE", count=4, handlesPtr=u.u64s(hs))[0], "NV_OK")


@case("a GPU read of an unmapped page is a fatal fault (in a child), not zeros")
def _(u: Uvm, check: Check):
    proc = _child(u, "fault")
    out, err = proc.communicate(timeout=CHILD_TIMEOUT)
    check("child read after unmap", (out.strip().splitlines() or ["no answer: " + err[-200:]])[-1], "faulted")
    base = u.range(2 * MiB)  # this process's context is unaffected
    hs = u.alloc(1)
    check("parent still maps", u.map(base, hs), "NV_OK")
    u.view(base, K64).fill_(5)
    check("parent still writes and reads", int((u.view(base, K64) == 5).all().item()), 1)
    u.unmap(base, K64)
    u.free(hs)
    u.drop_range(base)


@case("fork: a child holding the fd is refused every KVC ioctl; the parent is untouched")
def _(u: Uvm, check: Check):
    base = u.range(2 * MiB)
    hs = u.alloc(2)
    u.map(base, hs)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # raw ioctls only: CUDA itself does not survive fork
        answers = {"alloc": u.call("UVM_KVC_ALLOC", gpuUuid=u.uuid, pageSize=K64, count=1,
                                   handlesPtr=u.u64s([0]))[0],
                   "free": u.call("UVM_KVC_FREE", count=2, handlesPtr=u.u64s(hs))[0],
                   "unmap": u.unmap(base, 2 * K64),
                   "owner": int(u.call("UVM_KVC_QUERY", gpuUuid=u.uuid)[1].callerState)}
        os.write(w, json.dumps(answers).encode())
        os._exit(0)
    os.close(w)
    answers = json.loads(os.read(r, 4096) or b"{}")
    os.close(r)
    os.waitpid(pid, 0)
    for name in ("alloc", "free", "unmap"):
        check(f"child {name}", answers.get(name), "NV_ERR_ILLEGAL_ACTION")
    check("child is told it does not own the va_space", answers.get("owner", 1) & u.abi.UVM_KVC_CALLER_OWNS_VA_SPACE, 0)
    check("parent's pages still mapped", u.map(base, hs[:1], flags=u.flag("UVM_KVC_MAP_FLAGS_NO_REPLACE")),
          "NV_ERR_UVM_ADDRESS_IN_USE")
    u.unmap(base, 2 * K64)
    u.free(hs)
    u.drop_range(base)


@case("cross-process: pages a process filled and left are zero for the next process")
def _(u: Uvm, check: Check):
    mib = 256
    proc = _child(u, "fill", str(mib))
    out, err = proc.communicate(timeout=CHILD_TIMEOUT)
    if not check("child filled its pages and exited", out.strip().splitlines()[-1:] or [err[-200:]], ["filled"]):
        return
    n = mib * MiB // K64 + 64
    base = u.range(n * K64)
    hs = []
    for i in range(0, n, u.max_batch):
        hs += u.alloc(min(u.max_batch, n - i))
        u.map(base + i * K64, hs[i:])
    v = u.view(base, n * K64)
    check(f"{n} fresh pages (the child's memory among them, likely) read as zeros", int(v.count_nonzero().item()), 0)
    del v
    u.unmap(base, n * K64)
    u.free(hs)
    u.drop_range(base)


def child_fill(u: Uvm, mib: int) -> None:
    n = mib * MiB // K64
    base = u.range(n * K64)
    for i in range(0, n, u.max_batch):
        part = u.alloc(min(u.max_batch, n - i))
        u.map(base + i * K64, part)
    u.view(base, n * K64).fill_(0x5A5A5A5A)
    torch.cuda.synchronize(u.device)
    print("filled", flush=True)
    os._exit(0)  # no cleanup: the driver reclaims, and must zero before anyone else sees it


@case("kill -9 with a MAP in flight, 20 times: all GPU memory comes back")
def _(u: Uvm, check: Check):
    import random

    baseline = _free_bytes(u)
    rng = random.Random(1234)
    for i in range(20):
        proc = _child(u, "churn")
        if proc.stdout.readline().strip() != "churning":
            proc.kill()
            check(f"kill {i}: child started", proc.communicate(timeout=CHILD_TIMEOUT)[1][-300:], "churning")
            return
        time.sleep(rng.uniform(0, 0.05))
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=CHILD_TIMEOUT)
    after = _wait_back(u, baseline, slack=8 * MiB)
    check.true(f"free memory back to baseline after 20 kills ({(baseline - after) / MiB:.1f} MiB short)",
               after >= baseline - 8 * MiB)


def child_churn(u: Uvm) -> None:
    n = min(u.max_batch, 4096)
    base = u.range(2 * n * K64)
    hs = u.alloc(n)
    entries = u.entries([(base + 2 * i * K64, h) for i, h in enumerate(hs)])
    print("churning", flush=True)
    while True:  # until killed, mostly inside MAP_SCATTER and UNMAP
        u.call("UVM_KVC_MAP_SCATTER", gpuUuid=u.uuid, count=n, entriesPtr=entries)
        u.unmap(base, 2 * n * K64)


@case("limits: per-process cap (root sets it), EVICT refused unless allowed, running out is a clean error")
def _(u: Uvm, check: Check):
    out = u.u64s([0] * u.max_batch)
    if _read_param_text("uvm_kvc_allow_evict") not in (None, "Y\n"):
        check("EVICT without uvm_kvc_allow_evict", u.call(
            "UVM_KVC_ALLOC", flags=u.flag("UVM_KVC_ALLOC_FLAGS_EVICT"), gpuUuid=u.uuid, pageSize=K64, count=1,
            handlesPtr=out)[0], "NV_ERR_INSUFFICIENT_PERMISSIONS")
    held = int(u.ok("UVM_KVC_QUERY", gpuUuid=u.uuid).processBytes)
    old = _read_param_text("uvm_kvc_max_mb_per_process")
    if old is not None and _write_param("uvm_kvc_max_mb_per_process", str((held >> 20) + 64)):
        try:
            hs = u.alloc(1024)  # 64 MiB: exactly the room left
            check("one more page past the per-process cap", u.call(
                "UVM_KVC_ALLOC", gpuUuid=u.uuid, pageSize=K64, count=1, handlesPtr=out)[0],
                "NV_ERR_INSUFFICIENT_RESOURCES")
            u.free(hs)
        finally:
            _write_param("uvm_kvc_max_mb_per_process", old.strip())
    else:
        check("per-process cap: not root here, not checked", "skipped", "skipped")
    # Out of memory (the GPU-wide cap or vidmem itself): a clean error, nothing kept.
    before = int(u.ok("UVM_KVC_QUERY", gpuUuid=u.uuid).fdBytes)
    hs, status = [], "NV_OK"
    limit = int(u.ok("UVM_KVC_QUERY", gpuUuid=u.uuid).gpuLimitBytes) // K64 + u.max_batch
    while status == "NV_OK" and len(hs) < limit:
        status, p = u.call("UVM_KVC_ALLOC", gpuUuid=u.uuid, pageSize=K64, count=u.max_batch, handlesPtr=out)
        if status == "NV_OK":
            hs += list(u.abi.ffi.cast("NvU64 *", out)[0:u.max_batch])
    check.true(f"allocating until it fails ends in a clean error ({status} after {len(hs) * K64 >> 20} MiB)",
               status in ("NV_ERR_NO_MEMORY", "NV_ERR_INSUFFICIENT_RESOURCES"))
    for i in range(0, len(hs), u.max_batch):
        u.free(hs[i:i + u.max_batch])
    check("everything given back", int(u.ok("UVM_KVC_QUERY", gpuUuid=u.uuid).fdBytes), before)


@case("map_scatter: a decode step, one page for each of maxBatch regions in 64 ranges, in one call")
def _(u: Uvm, check: Check):
    n = u.max_batch
    per_range = -(-n // 64)
    bases = [u.range(per_range * 2 * MiB) for _ in range(64)]
    hs = []
    for i in range(0, n, u.max_batch):
        hs += u.alloc(min(u.max_batch, n - i))
    vas = [bases[i % 64] + (i // 64) * 2 * MiB + 5 * K64 for i in range(n)]
    t0 = time.perf_counter()
    status, p = u.call("UVM_KVC_MAP_SCATTER", gpuUuid=u.uuid, count=n, entriesPtr=u.entries(list(zip(vas, hs))),
                       flags=u.flag("UVM_KVC_MAP_FLAGS_NO_REPLACE"))
    ms = (time.perf_counter() - t0) * 1e3
    check(f"one MAP_SCATTER of {n} pages ({ms:.1f} ms)", status, "NV_OK")
    for i in (0, n // 2, n - 1):
        u.view(vas[i], K64).fill_(i + 1)
    torch.cuda.synchronize(u.device)
    check.true("pages hold their own data", all(int((u.view(vas[i], K64) == i + 1).all().item()) for i in (0, n // 2, n - 1)))
    for b in bases:
        u.drop_range(b)  # UVM_FREE clears every PTE of the range
    for i in range(0, n, u.max_batch):
        u.free(hs[i:i + u.max_batch])


def child_fault(u: Uvm) -> None:
    base = u.range(2 * MiB)
    hs = u.alloc(1)
    u.map(base, hs)
    view = u.view(base, K64)
    view.fill_(1)
    torch.cuda.synchronize(u.device)
    u.unmap(base, K64)
    try:
        value = int(view.sum().item())
        torch.cuda.synchronize(u.device)
        print(f"read {value}", flush=True)
    except RuntimeError as exc:  # "an illegal memory access was encountered" (CUDA error 700)
        print("faulted" if "illegal memory access" in str(exc) else f"error: {exc}", flush=True)
    os._exit(0)  # the context is dead: skip every destructor


def child_hold(u: Uvm, mib: int) -> None:
    n = mib * MiB // K64
    base = u.range(n * K64)
    hs = []
    for i in range(0, n, u.max_batch):
        part = u.alloc(min(u.max_batch, n - i))
        if u.map(base + i * K64, part) != "NV_OK":
            raise SystemExit("map failed in child")
        hs += part
    u.view(base, n * K64).fill_(3)
    torch.cuda.synchronize(u.device)
    print("ready", flush=True)
    sys.stdin.readline()
    os._exit(0)  # no cleanup at all: the driver must reclaim on fd close


def child_foreign(u: Uvm) -> None:
    hs = json.loads(sys.stdin.read())
    base = u.range(2 * MiB)
    answers = {"map": u.map(base, hs),
               "free": u.call("UVM_KVC_FREE", count=len(hs), handlesPtr=u.u64s(hs))[0]}
    print(json.dumps(answers), flush=True)


# managed memory through the driver API (torch has no cudaMallocManaged) -------------------------
def _managed_alloc(u: Uvm, nbytes: int) -> int:
    """``cuMemAllocManaged`` on torch's (current) context; 0 when it cannot be had."""
    from cffi import FFI

    ffi = FFI()
    ffi.cdef("int cuMemAllocManaged(unsigned long long *p, size_t n, unsigned int f);"
             "int cuMemFree_v2(unsigned long long p);")
    try:
        lib = ffi.dlopen(u.cuda.LIBRARY_NAMES[0])
    except OSError:
        return 0
    out = ffi.new("unsigned long long *")
    u._managed = lib
    return out[0] if lib.cuMemAllocManaged(out, nbytes, 1) == 0 else 0  # CU_MEM_ATTACH_GLOBAL


def _managed_free(u: Uvm, ptr: int) -> None:
    u._managed.cuMemFree_v2(ptr)


# --- main --------------------------------------------------------------------------------------
def refuse(message: str) -> None:
    print(f"uvm_ioctl_test: cannot run here: {message}", file=sys.stderr)
    sys.exit(2)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", type=int, default=0, help="CUDA device ordinal (default 0)")
    ap.add_argument("--json", action="store_true", help="print results as JSON")
    ap.add_argument("-k", default="", help="run only cases whose name contains this")
    ap.add_argument("--child-hold", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--child-foreign", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--child-fault", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--child-fill", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--child-churn", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if not torch.cuda.is_available():
        refuse("torch sees no CUDA GPU")
    if args.device >= torch.cuda.device_count():
        refuse(f"no CUDA device {args.device}")
    from pyvattn.backends.uvm import UvmBackend

    device = torch.device("cuda", args.device)
    torch.zeros(1, device=device)
    probe = UvmBackend.probe(device)
    if not probe.available:
        refuse(probe.reason)
    u = Uvm(args.device)
    if args.child_hold:
        child_hold(u, args.child_hold)
        return 0
    if args.child_foreign:
        child_foreign(u)
        return 0
    if args.child_fault:
        child_fault(u)
        return 0
    if args.child_fill:
        child_fill(u, args.child_fill)
        return 0
    if args.child_churn:
        child_churn(u)
        return 0

    results = []
    for name, fn, needs in CASES:
        if args.k not in name:
            continue
        r = Result(name)
        if needs and not u.has(needs):
            r.detail, r.expected, r.got = f"header has no {needs}", "-", "skipped"
        else:
            try:
                fn(u, Check(r))
            except Skip as why:
                r.detail, r.expected, r.got = str(why), "-", "skipped"
            except Exception as exc:
                r.passed, r.got = False, f"{type(exc).__name__}: {exc}"
                r.detail = traceback.format_exc(limit=3).strip().splitlines()[-1]
        results.append(r)
        u.keep.clear()
    for base in list(u.ranges):  # a failed case may leave its range behind
        u.call("UVM_FREE", base=base, length=u.ranges.pop(base))

    failed = [r for r in results if not r.passed]
    if args.json:
        print(json.dumps({"device": str(device), "probe": probe.reason, "passed": len(results) - len(failed),
                          "failed": len(failed), "cases": [r.__dict__ for r in results]}, indent=2))
    else:
        print(f"{probe.reason}\n")
        w = max(len(r.case) for r in results) if results else 10
        print(f"{'case':<{w}}  result  detail")
        for r in results:
            mark = "SKIP" if r.got == "skipped" else ("PASS" if r.passed else "FAIL")
            line = f"{r.case:<{w}}  {mark:<6}  "
            line += f"{len(r.checks)} checks" if r.passed and r.checks else \
                f"{r.detail}: expected {r.expected}, got {r.got}"
            print(line)
        print(f"\n{len(results) - len(failed)} passed, {len(failed)} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

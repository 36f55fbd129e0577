"""The uvm64k ioctl ABI as Python sees it agrees with what a C compiler makes of the header.

Runs anywhere (no GPU, no module): gcc compiles, with -m64 and with -m32, a file that includes the
header through its own user-space shim and stores sizeof/offsetof of every struct field and every
constant in the object file, which is read back (nothing is run, so the -m32 check needs no 32-bit
C library); cffi's layout of the same structs (parsed from the same header by pyvattn._ffi.uvm)
must match both exactly. The header copy shipped in the package must be the driver patch's, byte
for byte.
"""

from __future__ import annotations

import errno
import os
import shutil
import struct
import subprocess
from pathlib import Path

import pytest
import torch

from pyvattn import backends
from pyvattn._ffi import uvm
from pyvattn.errors import BackendUnavailable, OSCallError, UvmError

ROOT = Path(__file__).resolve().parents[1]
DRIVER_HEADER = ROOT / "driver-patch" / "include" / "uvm_kvc_ioctl.h"
UVM_TEST_RANGE = range(200, 512)  # UVM_TEST_IOCTL_BASE(0) .. (312) and headroom (memo 4.5)


#: Planted in every C layout: the offset of a NvU64 after a NvU32 in a plain struct is 4 under
#: the i386 ABI and 8 under x86-64, so a "-m32" build that is not really 32-bit fails the test.
ABI_CANARY = "offsetof canary.u64_after_u32"


def _c_layout_source() -> tuple[str, list[str]]:
    """C that stores sizeof/offsetof of every struct field and every constant, as unsigned long
    long values, in a section of its own; and the names of those values, in order."""
    names, exprs = [], []
    for struct in uvm.ABI.structs:
        names.append(f"sizeof {struct}")
        exprs.append(f"sizeof({struct})")
        for name, _ in uvm.ffi.typeof(struct).fields:
            names += [f"offsetof {struct}.{name}", f"sizeof {struct}.{name}"]
            exprs += [f"offsetof({struct}, {name})", f"sizeof((({struct} *)0)->{name})"]
    for name in uvm.ABI.constants:
        names.append(f"value {name}")
        exprs.append(f"(unsigned long long)({name})")
    names.append(ABI_CANARY)
    exprs.append("offsetof(struct canary { NvU32 a; NvU64 b; }, b)")
    src = "\n".join(["#include <stddef.h>", '#include "uvm_kvc_ioctl.h"',
                     '__attribute__((section(".kvc_abi"), used)) const unsigned long long kvc_abi_values[] = {',
                     *[f"    {e}," for e in exprs], "};", ""])
    return src, names


def _c_layout(tmp_path: Path, bits: int) -> dict[str, int]:
    """What gcc -m{bits} makes of the header: compiled only (nothing runs, so no 32-bit libc or
    loader is needed), the values read back from the object file's .kvc_abi section."""
    if shutil.which("gcc") is None or shutil.which("objcopy") is None:
        pytest.skip("gcc and objcopy (binutils) are needed")
    src, names = _c_layout_source()
    c, obj, raw = tmp_path / f"abi{bits}.c", tmp_path / f"abi{bits}.o", tmp_path / f"abi{bits}.bin"
    c.write_text(src)
    cmd = ["gcc", f"-m{bits}", "-std=c11", "-Wall", "-Werror", "-I", str(uvm.HEADER.parent), "-c", str(c), "-o", str(obj)]
    built = subprocess.run(cmd, capture_output=True, text=True)
    if built.returncode and bits == 32:
        # No 32-bit C library headers here (gcc-multilib): the header's user-space shim then takes
        # <stdint.h> from gcc itself. The struct layout is the compiler's i386 ABI either way.
        built = subprocess.run(cmd + ["-ffreestanding"], capture_output=True, text=True)
    assert built.returncode == 0, built.stderr
    subprocess.run(["objcopy", "-O", "binary", "-j", ".kvc_abi", str(obj), str(raw)], check=True)
    values = struct.unpack(f"<{len(names)}Q", raw.read_bytes())
    return dict(zip(names, values))


def _python_layout() -> dict[str, int]:
    layout = {}
    for struct in uvm.ABI.structs:
        layout[f"sizeof {struct}"] = uvm.ffi.sizeof(struct)
        for name, f in uvm.ffi.typeof(struct).fields:
            layout[f"offsetof {struct}.{name}"] = uvm.ffi.offsetof(struct, name)
            layout[f"sizeof {struct}.{name}"] = uvm.ffi.sizeof(f.type)
    for name, value in uvm.ABI.constants.items():
        layout[f"value {name}"] = value % (1 << 64)
    return layout


# --- the header ----------------------------------------------------------------------------
def test_packaged_header_is_the_driver_patch_header():
    assert DRIVER_HEADER.exists(), f"{DRIVER_HEADER} is missing"
    assert uvm.HEADER.read_bytes() == DRIVER_HEADER.read_bytes(), \
        f"copy {DRIVER_HEADER} to {uvm.HEADER} (the package must ship the driver's ABI)"


def test_header_declares_the_memo_ioctls_and_structs():
    for name in ("UVM_KVC_QUERY", "UVM_KVC_ALLOC", "UVM_KVC_FREE", "UVM_KVC_CREATE_RANGE",
                 "UVM_KVC_MAP", "UVM_KVC_UNMAP"):
        assert name in uvm.IOCTLS, name
        fields = [f for f, _ in uvm.ffi.typeof(f"{name}_PARAMS").fields]
        # memo 4.5: every struct starts with version, flags and ends with rmStatus, pad0
        assert fields[:2] == ["version", "flags"], (name, fields)
        assert fields[-2:] == ["rmStatus", "pad0"], (name, fields)
        assert uvm.ffi.sizeof(f"{name}_PARAMS") % 8 == 0
        assert uvm.ffi.sizeof(f"{name}_PARAMS") <= 288  # routed with UVM_ROUTE_CMD_STACK_*
    assert (uvm.UVM_KVC_MAGIC).to_bytes(8, "little") == b"UVMKVC01"


def test_every_nvu64_field_is_declared_8_byte_aligned():
    """compat_ioctl shares the handler, so 32-bit callers must see the 64-bit layout: every NvU64
    carries UVM_KVC_ALIGN8 (NV_ALIGN_BYTES(8) in the kernel). Checked in the text as well as by
    the -m32 compile below."""
    text = uvm.HEADER.read_text()
    block = text[text.index(uvm.BEGIN):text.index(uvm.END)]
    fields = [line.split("/*")[0].strip() for line in block.splitlines() if line.strip().startswith("NvU64")]
    assert fields
    unaligned = [f for f in fields if "UVM_KVC_ALIGN8" not in f]
    assert not unaligned, unaligned


@pytest.mark.parametrize("bits", [64, 32])
def test_c_compiler_and_cffi_agree_on_every_struct_and_constant(tmp_path, bits):
    """compat_ioctl shares the 64-bit handler, so a 32-bit caller's layout must be the 64-bit one."""
    c_layout = _c_layout(tmp_path, bits)
    assert c_layout.pop(ABI_CANARY) == (4 if bits == 32 else 8), f"gcc -m{bits} did not use the {bits}-bit ABI"
    py_layout = _python_layout()
    assert c_layout.keys() == py_layout.keys()
    mismatches = {k: (c_layout[k], py_layout[k]) for k in c_layout if c_layout[k] != py_layout[k]}
    assert not mismatches, f"(C -m{bits}, cffi) differ: {mismatches}"


def test_ioctl_numbers_are_in_the_kvc_block_and_clear_of_uvm_test_ioctls():
    numbers = list(uvm.ABI.ioctls.values())
    assert numbers and len(set(numbers)) == len(numbers)
    for name, number in uvm.ABI.ioctls.items():
        assert 1536 <= number <= 2047, (name, number)
        assert number not in UVM_TEST_RANGE, (name, number)
    assert uvm.IOCTLS["UVM_FREE"] == 34  # the stock ioctl that destroys a range


def test_status_name_covers_every_status_in_the_header():
    statuses = {n: v for n, v in uvm.ABI.constants.items() if n.startswith("UVM_KVC_STATUS_")}
    assert len(statuses) >= 10
    for define, code in statuses.items():
        name = uvm.status_name(code)
        assert name.startswith(("NV_ERR_", "NV_OK")), (define, name)
        assert define.endswith(name.removeprefix("NV_ERR_")), (define, name)
    assert uvm.status_name(0) == "NV_OK"
    for needed in ("NV_ERR_INVALID_ADDRESS", "NV_ERR_INVALID_ARGUMENT", "NV_ERR_NOT_SUPPORTED",
                   "NV_ERR_INVALID_FLAGS", "NV_ERR_INVALID_OBJECT_HANDLE", "NV_ERR_NO_MEMORY",
                   "NV_ERR_UVM_ADDRESS_IN_USE", "NV_ERR_INSUFFICIENT_RESOURCES", "NV_ERR_IN_USE",
                   "NV_ERR_INVALID_DEVICE"):
        assert needed in uvm.STATUS, needed
    assert uvm.status_name(0xDEAD0) == "NV_STATUS_0xdead0"


#: NV_STATUS values from NVIDIA's nvstatuscodes.h (identical in every driver branch since 2014).
NV_STATUS_VALUES = {
    "NV_OK": 0x00, "NV_ERR_BUSY_RETRY": 0x03, "NV_ERR_ILLEGAL_ACTION": 0x16, "NV_ERR_IN_USE": 0x17,
    "NV_ERR_INSUFFICIENT_RESOURCES": 0x1A, "NV_ERR_INSUFFICIENT_PERMISSIONS": 0x1B, "NV_ERR_INVALID_ADDRESS": 0x1E, "NV_ERR_INVALID_ARGUMENT": 0x1F,
    "NV_ERR_INVALID_DEVICE": 0x26, "NV_ERR_INVALID_FLAGS": 0x29, "NV_ERR_INVALID_LIMIT": 0x2E,
    "NV_ERR_INVALID_OBJECT_HANDLE": 0x33, "NV_ERR_INVALID_STATE": 0x40, "NV_ERR_NO_MEMORY": 0x51,
    "NV_ERR_NOT_SUPPORTED": 0x56, "NV_ERR_OUT_OF_RANGE": 0x5B, "NV_ERR_UVM_ADDRESS_IN_USE": 0x68,
    "NV_ERR_GENERIC": 0xFFFF,
}


def test_status_codes_are_nvidias():
    """The header restates NV_STATUS values for user space; they must be the driver's own."""
    known = {name: code for name, code in uvm.STATUS.items() if name in NV_STATUS_VALUES}
    assert known == {name: NV_STATUS_VALUES[name] for name in known}
    assert len(known) >= 10


# --- the parser ------------------------------------------------------------------------------
def test_evaluator_handles_c_literals_and_refuses_anything_else():
    names = {"A": 3}
    assert uvm.evaluate("(1u << 16) | 0x10ULL", names) == 65552
    assert uvm.evaluate("010 + A * 2", names) == 14
    assert uvm.evaluate("UVM_KVC_IOCTL_BASE(A + 1)", names) == 1540
    for bad in ("__import__('os')", "A.real", "B + 1", "1 / 2", "[1][0]", "1 << 200", "'x'"):
        with pytest.raises(uvm.HeaderError):
            uvm.evaluate(bad, names)


def test_parser_reads_a_block_and_rejects_what_it_does_not_know():
    text = f"""junk before
    {uvm.BEGIN}
    #define UVM_KVC_IOCTL_BASE(i) UVM_IOCTL_BASE(1536 + (i))
    #define N 2 /* a comment */
    #define UVM_KVC_STATUS_NV_ERR_X 0x1f
    #define UVM_KVC_THING UVM_KVC_IOCTL_BASE(N)
    typedef struct {{
        NvU32 version;
        NvU64 base UVM_KVC_ALIGN8;  // trailing comment
        NvU64 reserved[N] UVM_KVC_ALIGN8;
    }} UVM_KVC_THING_PARAMS;
    {uvm.END}"""
    abi = uvm.parse(text)
    assert abi.constants == {"N": 2, "UVM_KVC_STATUS_NV_ERR_X": 31, "UVM_KVC_THING": 1538}
    assert abi.ioctls == {"UVM_KVC_THING": 1538} and abi.status == {"NV_ERR_X": 31}
    f = uvm.build_ffi(abi)
    assert f.sizeof("UVM_KVC_THING_PARAMS") == 32 and f.offsetof("UVM_KVC_THING_PARAMS", "base") == 8
    with pytest.raises(uvm.HeaderError):
        uvm.parse(text.replace("#define N 2", "#if N"))
    with pytest.raises(uvm.HeaderError):
        uvm.parse(text.replace("typedef struct", "int stray; typedef struct"))
    with pytest.raises(uvm.HeaderError):
        uvm.parse("no markers")


def test_params_set_version_and_fields():
    p = uvm.params("UVM_KVC_QUERY", gpuUuid=bytes(range(16)))
    assert p.version == uvm.UVM_KVC_ABI_VERSION and p.flags == 0 and p.rmStatus == 0
    assert bytes(uvm.ffi.buffer(p.gpuUuid.uuid)) == bytes(range(16))
    with pytest.raises(TypeError):
        uvm.params("UVM_KVC_QUERY", nosuchfield=1)


# --- calls and probing without the module ----------------------------------------------------
def test_ioctl_on_a_non_uvm_fd_is_a_typed_os_error():
    fd = os.open("/dev/null", os.O_RDWR)
    try:
        with pytest.raises(OSCallError) as info:
            uvm.ioctl(fd, uvm.UVM_KVC_QUERY, uvm.params("UVM_KVC_QUERY"))
        assert info.value.status == "ENOTTY" and info.value.code == errno.ENOTTY
        assert info.value.call == "UVM_KVC_QUERY"
        assert uvm.raw_ioctl(fd, uvm.UVM_KVC_QUERY, uvm.params("UVM_KVC_QUERY")) == (errno.ENOTTY, 0)
    finally:
        os.close(fd)


def test_rm_status_failure_is_a_typed_uvm_error_even_when_the_syscall_succeeds():
    """UVM's routing returns 0 and reports failure in rmStatus only. Stand-in for that answer:
    FIOCLEX succeeds on any fd and leaves the struct (with rmStatus preset) untouched."""
    import termios

    r, w = os.pipe()
    try:
        p = uvm.params("UVM_KVC_QUERY")
        p.rmStatus = uvm.STATUS["NV_ERR_NOT_SUPPORTED"]
        # FIOCLEX ignores its argument and succeeds on any fd.
        with pytest.raises(UvmError) as info:
            uvm.ioctl(r, termios.FIOCLEX, p, call="UVM_KVC_QUERY")
        assert info.value.status == "NV_ERR_NOT_SUPPORTED"
        assert info.value.code == uvm.STATUS["NV_ERR_NOT_SUPPORTED"]
        p.rmStatus = 0
        assert uvm.ioctl(r, termios.FIOCLEX, p) is p
    finally:
        os.close(r)
        os.close(w)


def test_probe_here_is_a_clean_unavailable_reason():
    from pyvattn.backends.uvm import UvmBackend, uvm_fds

    for device in ("cuda", "cuda:0", "cpu"):
        p = backends.probe("uvm64k", torch.device(device))
        if p.available:
            pytest.skip("the patched module answers here; this test is about machines without it")
        assert p.reason and "Traceback" not in p.reason
        assert p.reason == UvmBackend.probe(torch.device(device)).reason
    assert "CUDA devices only" in UvmBackend.probe(torch.device("cpu")).reason
    if not uvm_fds():
        assert UvmBackend.probe(torch.device("cuda")).available is False


def test_auto_never_picks_uvm64k_without_the_module():
    p = backends.probe("uvm64k", torch.device("cuda"))
    if p.available:
        pytest.skip("the patched module answers here")
    with pytest.raises(BackendUnavailable, match="uvm64k"):
        backends.select("uvm64k", torch.device("cuda"))
    if torch.cuda.is_available():
        assert backends.select("auto", torch.device("cuda")).name != "uvm64k"


def test_query_failures_become_precise_reasons():
    from pyvattn.backends.uvm import _why_not

    stock = _why_not(OSCallError("UVM_KVC_QUERY", "EINVAL", errno.EINVAL))
    assert "stock driver" in stock
    assert "stock driver" in _why_not(OSCallError("UVM_KVC_QUERY", "ENOSYS", errno.ENOSYS))
    mismatch = _why_not(UvmError("UVM_KVC_QUERY", "NV_ERR_NOT_SUPPORTED", uvm.STATUS["NV_ERR_NOT_SUPPORTED"]))
    assert "ABI version" in mismatch


def test_page_sizes_and_granularity_without_a_gpu():
    from pyvattn.backends.uvm import UvmBackend

    cuda = torch.device("cuda")
    assert UvmBackend.granularity(cuda) == 64 << 10 == UvmBackend.default_page_size(cuda)
    for ok in (64 << 10, 128 << 10, 256 << 10):
        UvmBackend.check_page_size(cuda, ok)
    for bad in (0, 4096, 192 << 10, 2 << 20):
        with pytest.raises(ValueError, match="page_size"):
            UvmBackend.check_page_size(cuda, bad)
    with pytest.raises(ValueError, match="device"):
        UvmBackend.check_page_size(torch.device("cpu"), 64 << 10)

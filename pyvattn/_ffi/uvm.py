"""The pyvattn UVM ioctl ABI, read from the kernel patch's own header.

``uvm_kvc_ioctl.h`` next to this file is a byte-identical copy of
``driver-patch/include/uvm_kvc_ioctl.h`` (a test checks it). Its ABI block, between
``/* UVM_KVC_ABI_BEGIN */`` and ``/* UVM_KVC_ABI_END */``, holds only integer ``#define``s and
``typedef struct {...} NAME;``; it is parsed once, at import, into

* ``ffi``: a cffi FFI whose cdef declares every struct (and libc ``ioctl``),
* ``CONSTANTS`` (also module attributes: ``uvm.UVM_KVC_QUERY``, ``uvm.UVM_KVC_ABI_VERSION``...),
* ``IOCTLS``: the ioctl request numbers by name (defines written as ``UVM_KVC_IOCTL_BASE(n)``),
* ``STATUS``: NV_STATUS name -> code, from the header's ``UVM_KVC_STATUS_<NAME>`` defines.

So the Python side cannot drift from the kernel side: there is no second copy of any struct.

:func:`ioctl` makes the call. UVM's routing copies the struct back and returns 0 from the syscall
even when the handler failed, so the real answer is ``rmStatus``: a syscall error becomes
:class:`~pyvattn.errors.OSCallError` (errno name), ``rmStatus != NV_OK`` becomes
:class:`~pyvattn.errors.UvmError` (``NV_ERR_...`` name).
"""

from __future__ import annotations

import ast
import errno as _errno
import operator
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

from cffi import FFI

from ..errors import OSCallError, UvmError

HEADER = Path(__file__).with_name("uvm_kvc_ioctl.h")
IOCTL_BASE = 1536  # UVM_KVC_IOCTL_BASE(n) == 1536 + n on Linux
BEGIN, END = "/* UVM_KVC_ABI_BEGIN */", "/* UVM_KVC_ABI_END */"

#: The NV types the ABI block uses, as their user-space definitions (uvm_types.h / nvtypes.h).
TYPES_CDEF = """
typedef uint8_t NvU8;
typedef uint32_t NvU32;
typedef uint64_t NvU64;
typedef int32_t NvS32;
typedef NvU32 NV_STATUS;
typedef struct { NvU8 uuid[16]; } NvProcessorUuid;
"""

#: Stock UVM ioctls the backend also needs (uvm_ioctl.h, unchanged since 2016): destroying a
#: range made by UVM_KVC_CREATE_RANGE is the stock UVM_FREE (memo 4.5, 4.9).
STOCK_CDEF = """
typedef struct {
    NvU64 base;
    NvU64 length;
    NV_STATUS rmStatus;
} UVM_FREE_PARAMS;
"""
STOCK_IOCTLS = {"UVM_FREE": 34}

LIBC_CDEF = "int ioctl(int fd, unsigned long request, ...);"


class HeaderError(ImportError):
    """The header's ABI block is not in the promised form. An ImportError, so that the backend
    registry reports the uvm64k backend as unloadable instead of failing ``backend="auto"``."""


# --- the header parser -------------------------------------------------------------------------
_BINOPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
           ast.LShift: operator.lshift, ast.RShift: operator.rshift,
           ast.BitOr: operator.or_, ast.BitAnd: operator.and_}
_C_INT = re.compile(r"\b(0[xX][0-9a-fA-F]+|0[0-7]*|[1-9][0-9]*)[uUlL]*\b")
_COMMENT = re.compile(r"/\*.*?\*/|//[^\n]*", re.S)
_DEFINE = re.compile(r"^\s*#\s*define\s+(\w+)(\()?(.*)$")
_STRUCT = re.compile(r"typedef\s+struct\s*\w*\s*\{(?P<body>[^{}]*)\}\s*(?P<name>\w+)\s*;", re.S)
_ALIGN8 = re.compile(r"\bUVM_KVC_ALIGN8\b(\s*\([^()]*\))?")


def _c_int(m: re.Match) -> str:
    lit = m.group(1)
    if len(lit) > 1 and lit[0] == "0" and lit[1] not in "xX":
        return str(int(lit, 8))  # C octal
    return str(int(lit, 0))


def evaluate(expr: str, names: dict[str, int]) -> int:
    """Value of a C integer constant expression made of literals (any U/L suffix), earlier
    ``names``, ``+ - * << >> | &``, parentheses and ``UVM_KVC_IOCTL_BASE(n)``. Anything else
    raises ``HeaderError``: no Python is ever executed."""
    try:
        tree = ast.parse(_C_INT.sub(_c_int, expr.strip()), mode="eval")
    except SyntaxError as exc:
        raise HeaderError(f"not an integer expression: {expr!r}") from exc

    def ev(node: ast.AST) -> int:
        if isinstance(node, ast.Constant) and type(node.value) is int:
            return node.value
        if isinstance(node, ast.Name):
            if node.id not in names:
                raise HeaderError(f"{node.id} is not defined before {expr!r}")
            return names[node.id]
        if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
            left, right = ev(node.left), ev(node.right)
            if isinstance(node.op, (ast.LShift, ast.RShift)) and not 0 <= right < 64:
                raise HeaderError(f"shift by {right} in {expr!r}")
            return _BINOPS[type(node.op)](left, right)
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
            v = ev(node.operand)
            return -v if isinstance(node.op, ast.USub) else v
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
                and node.func.id == "UVM_KVC_IOCTL_BASE" and len(node.args) == 1 and not node.keywords):
            return IOCTL_BASE + ev(node.args[0])
        raise HeaderError(f"unsupported construct {ast.dump(node)} in {expr!r}")

    value = ev(tree.body)
    if not -(1 << 63) <= value < (1 << 64):
        raise HeaderError(f"{expr!r} = {value} does not fit in 64 bits")
    return value


@dataclass
class Abi:
    """What the header's ABI block declares."""

    constants: dict[str, int] = field(default_factory=dict)
    ioctls: dict[str, int] = field(default_factory=dict)  # the subset of constants that are requests
    status: dict[str, int] = field(default_factory=dict)  # "NV_ERR_..." -> code
    structs: dict[str, str] = field(default_factory=dict)  # name -> cdef body (ALIGN8 stripped)

    def cdef(self) -> str:
        return "".join(f"typedef struct {{{body}}} {name};\n" for name, body in self.structs.items())


def _status_name(suffix: str) -> str:
    """``UVM_KVC_STATUS_<suffix>`` -> the NV_STATUS name (NV_OK, NV_ERR_...)."""
    if suffix.startswith("NV_"):
        return suffix
    return "NV_OK" if suffix == "OK" else "NV_ERR_" + suffix


def parse(text: str) -> Abi:
    """Parse the ABI block of the header ``text`` (see the module docstring for the grammar)."""
    try:
        block = text[text.index(BEGIN) + len(BEGIN):text.index(END)]
    except ValueError:
        raise HeaderError(f"header has no {BEGIN} ... {END} block") from None
    block = _COMMENT.sub(lambda m: "\n" * m.group(0).count("\n") or " ", block)
    block = re.sub(r"\\\n", " ", block)
    abi = Abi()
    rest = []
    for line in block.splitlines():
        if not line.lstrip().startswith("#"):
            rest.append(line)
            continue
        m = _DEFINE.match(line)
        if not m:
            raise HeaderError(f"unsupported directive in the ABI block: {line.strip()!r}")
        name, function_like, value = m.group(1), m.group(2), m.group(3).strip()
        if function_like or not value:
            continue  # UVM_KVC_IOCTL_BASE(i) itself, include guards: not ABI values
        abi.constants[name] = evaluate(value, abi.constants)
        if "UVM_KVC_IOCTL_BASE" in value:
            abi.ioctls[name] = abi.constants[name]
        if name.startswith("UVM_KVC_STATUS_"):
            abi.status[_status_name(name[len("UVM_KVC_STATUS_"):])] = abi.constants[name]
    body = _ALIGN8.sub("", "\n".join(rest))
    for m in _STRUCT.finditer(body):
        # Array sizes written with defined names become numbers (cffi wants plain constants).
        abi.structs[m.group("name")] = re.sub(
            r"\[([^\]]+)\]", lambda a: f"[{evaluate(a.group(1), abi.constants)}]", m.group("body"))
    leftover = _STRUCT.sub("", body).strip()
    if leftover:
        raise HeaderError(f"unparsed text in the ABI block: {leftover[:80]!r}")
    return abi


def build_ffi(abi: Abi) -> FFI:
    """An FFI declaring the NV types, every struct of ``abi``, the stock structs we use, ioctl."""
    out = FFI()
    stock = "" if "UVM_FREE_PARAMS" in abi.structs else STOCK_CDEF
    out.cdef(TYPES_CDEF + abi.cdef() + stock + LIBC_CDEF)
    return out


# --- the ABI of this package's copy of the header ------------------------------------------------
ABI = parse(HEADER.read_text())
ffi = build_ffi(ABI)
_libc = ffi.dlopen(None)

CONSTANTS: dict[str, int] = dict(ABI.constants)
IOCTLS: dict[str, int] = {**STOCK_IOCTLS, **ABI.ioctls}
STATUS: dict[str, int] = {"NV_OK": 0, **ABI.status}
_STATUS_NAMES = {code: name for name, code in STATUS.items()}
_REQUEST_NAMES = {num: name for name, num in IOCTLS.items()}
globals().update(CONSTANTS)
globals().update(STOCK_IOCTLS)
NV_OK = STATUS["NV_OK"]


def _scatter_entry() -> tuple[str, tuple[int, int]]:
    """The MAP_SCATTER entry struct and the column of its ``va`` and ``handle`` fields, by the
    header's own names; a header without them is not one this package can speak."""
    name = "UVM_KVC_SCATTER_ENTRY"
    if name not in ABI.structs:
        raise HeaderError(f"the ABI header has no {name}")
    fields = [f for f, _ in ffi.typeof(name).fields]
    if sorted(fields) != ["handle", "va"] or ffi.sizeof(name) != 16:
        raise HeaderError(f"{name} is not {{NvU64 va; NvU64 handle;}}: {fields}")
    return name, (fields.index("va"), fields.index("handle"))


#: The struct MAP_SCATTER reads an array of, and which NvU64 column is the VA, which the handle.
SCATTER_ENTRY, SCATTER_FIELDS = _scatter_entry()


def status_name(code: int) -> str:
    """The NV_STATUS name of ``code`` (``NV_ERR_INVALID_ADDRESS``), or ``NV_STATUS_0x..``."""
    return _STATUS_NAMES.get(code, f"NV_STATUS_{code:#x}")


_FIELDS: dict[str, frozenset] = {}


def params(request: str, **fields):
    """A zeroed ``<request>_PARAMS`` struct with ``version`` set to the ABI version (when the
    struct has one) and the given ``fields``; ``gpuUuid`` may be given as 16 bytes."""
    p = ffi.new(f"{request}_PARAMS *")
    names = _FIELDS.get(request)
    if names is None:
        names = _FIELDS[request] = frozenset(f for f, _ in ffi.typeof(p[0]).fields)
    if "version" in names:
        p.version = CONSTANTS["UVM_KVC_ABI_VERSION"]
    for k, v in fields.items():
        if k not in names:
            raise TypeError(f"{request}_PARAMS has no field {k!r}")
        if k == "gpuUuid" and isinstance(v, (bytes, bytearray)):
            ffi.memmove(p.gpuUuid.uuid, bytes(v), 16)
        else:
            setattr(p, k, v)
    return p


#: How long a call keeps retrying EAGAIN (UVM's ioctl entry answers it while the system suspends or
#: resumes: its power-management lock is taken with a trylock, before anything else happens).
EAGAIN_RETRY_SECONDS = 30.0


def _syscall(fd: int, request: int, p) -> int:
    """The ioctl itself: 0, or the errno. EAGAIN is retried (with a growing pause, for at most
    ``EAGAIN_RETRY_SECONDS``): the driver did nothing, the call is simply early."""
    deadline, pause = None, 0.001
    while True:
        if _libc.ioctl(fd, request, ffi.cast("void *", p)) != -1:
            return 0
        err = ffi.errno
        if err != _errno.EAGAIN:
            return err
        now = time.monotonic()
        deadline = deadline or now + EAGAIN_RETRY_SECONDS
        if now >= deadline:
            return err
        time.sleep(min(pause, deadline - now))
        pause = min(pause * 2, 0.1)


def ioctl(fd: int, request: int, p, call: str | None = None):
    """Issue ioctl ``request`` on ``fd`` with the params struct pointer ``p``; return ``p``.

    Raises ``OSCallError`` when the syscall fails (a stock driver answers unknown requests with
    EINVAL or ENOSYS; EAGAIN is retried first, see ``_syscall``) and ``UvmError`` when the driver
    set ``rmStatus`` to anything but NV_OK.
    """
    call = call or _REQUEST_NAMES.get(request, f"ioctl {request}")
    err = _syscall(fd, request, p)
    if err:
        raise OSCallError(call, _errno.errorcode.get(err, f"E{err}"), err, os.strerror(err))
    status = p.rmStatus
    if status != NV_OK:
        raise UvmError(call, status_name(status), status)
    return p


def raw_ioctl(fd: int, request: int, p) -> tuple[int, int]:
    """The bare call for tests that expect failures: ``(errno or 0, rmStatus)``."""
    err = _syscall(fd, request, p)
    return (err, 0) if err else (0, p.rmStatus)

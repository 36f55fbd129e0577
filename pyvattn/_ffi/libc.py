"""libc through cffi (ABI mode: no compiler needed at install): the calls the host backend makes.

Constants are Linux's (identical on x86-64 and aarch64 for everything declared here).
"""

from __future__ import annotations

import errno as _errno
import os

from cffi import FFI

from ..errors import OSCallError

ffi = FFI()
ffi.cdef(
    """
    /* pointers as uintptr_t (same registers on LP64): no cdata casts on the hot path */
    uintptr_t mmap(uintptr_t addr, size_t length, int prot, int flags, int fd, long offset);
    int munmap(void *addr, size_t length);
    int memfd_create(const char *name, unsigned int flags);
    int ftruncate(int fd, long length);
    int fallocate(int fd, int mode, long offset, long len);
    int close(int fd);
    int ioctl(int fd, unsigned long request, void *arg);
    """
)
lib = ffi.dlopen(None)
raw_mmap = lib.mmap  # the bare call; module-level so benchmarks can observe it

PROT_NONE, PROT_READ, PROT_WRITE = 0x0, 0x1, 0x2
MAP_SHARED, MAP_PRIVATE, MAP_FIXED, MAP_ANONYMOUS, MAP_NORESERVE = 0x01, 0x02, 0x10, 0x20, 0x4000
MAP_POPULATE = 0x8000
MAP_FAILED = 2**64 - 1
MFD_CLOEXEC = 0x0001
FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE = 0x01, 0x02
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


def check(call: str, ret: int) -> int:
    """Raise ``OSCallError`` with the errno name when ``ret`` is -1; return ``ret`` otherwise."""
    if ret == -1:
        err = ffi.errno
        raise OSCallError(call, _errno.errorcode.get(err, f"E{err}"), err, os.strerror(err))
    return ret


def mmap(addr: int, length: int, prot: int, flags: int, fd: int = -1, offset: int = 0) -> int:
    ret = lib.mmap(addr, length, prot, flags, fd, offset)
    if ret == MAP_FAILED:
        check("mmap", -1)
    return ret


def munmap(addr: int, length: int) -> None:
    check("munmap", lib.munmap(ffi.cast("void *", addr), length))


def memfd_create(name: str, flags: int = MFD_CLOEXEC) -> int:
    return check("memfd_create", lib.memfd_create(name.encode(), flags))


def ftruncate(fd: int, length: int) -> None:
    check("ftruncate", lib.ftruncate(fd, length))


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    check("fallocate", lib.fallocate(fd, mode, offset, length))


def buffer(addr: int, length: int):
    """A writable Python buffer over raw memory (no copy); valid while the memory is mapped."""
    return ffi.buffer(ffi.cast("char *", addr), length)


def max_map_count() -> int:
    """``vm.max_map_count``: how many mappings (VMAs) one process may hold (65,530 by default)."""
    try:
        with open("/proc/sys/vm/max_map_count") as f:
            return int(f.read())
    except (OSError, ValueError):
        return 65530


def map_count() -> int:
    """Mappings this process holds now (lines of ``/proc/self/maps``)."""
    with open("/proc/self/maps", "rb") as f:
        return sum(1 for _ in f)

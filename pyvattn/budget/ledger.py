"""The SharedBudget ledger: a fixed table in a file under /dev/shm, locked with flock.

Layout (little-endian, declared once as numpy dtypes below)::

    header (64 bytes)   magic "PYVATTNB" | version u32 | slots u32 | limit i64 (-1: none) | reserved
    slot[SLOTS]         pid i64 | start_time u64 | pid_ns u64 | charged i64 | used i64 | retained i64
                        | label 64 bytes UTF-8              (pid 0: the slot is free)

A slot is one account. ``charged`` is the only fact the limit counts; ``used``/``retained`` are
what the owner last reported, for ``top``. A process is named by pid *and* start time (field 22
of /proc/<pid>/stat), so a reused pid is not mistaken for the process that died; ``pid_ns`` (the
inode of /proc/self/ns/pid) keeps a process from judging slots of another pid namespace, whose
pids it cannot see.

Lock: ``flock(LOCK_EX)`` on the file, taken for every read-modify-write (and held while a
new file is initialised). The kernel drops it when its holder dies, which a mutex in shared memory
would not. flock belongs to the open file, so one process's threads share it: a threading.Lock
orders them, and a forked child opens the file anew before it locks.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import threading
from pathlib import Path

import numpy as np

from ..errors import LedgerCorrupt, LedgerNotFound

MAGIC = b"PYVATTNB"
VERSION = 1
SLOTS = 128
NO_LIMIT = -1
LABEL_BYTES = 64

HEADER = np.dtype([("magic", "S8"), ("version", "<u4"), ("slots", "<u4"), ("limit", "<i8"),
                   ("reserved", "V40")])
SLOT = np.dtype([("pid", "<i8"), ("start_time", "<u8"), ("pid_ns", "<u8"), ("charged", "<i8"),
                 ("used", "<i8"), ("retained", "<i8"), ("label", f"S{LABEL_BYTES}")])
FILE_BYTES = HEADER.itemsize + SLOTS * SLOT.itemsize


def start_time(pid: int) -> int | None:
    """When ``pid`` started (clock ticks since boot), or ``None`` if it is gone or a zombie."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = stat[stat.rindex(b")") + 2:].split()  # the name before ")" may hold spaces
    if fields[0] in (b"Z", b"X"):  # exited: its memory is gone, only the exit status waits
        return None
    return int(fields[19])


def pid_namespace() -> int:
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return 0


class Ledger:
    """The ledger file of one name, mapped: ``header`` and ``slots`` are numpy views on it, and
    ``limit``, ``pid`` and ``charged`` views of their fields.

    Read-modify-write only inside ``with ledger.locked():``.
    """

    def __init__(self, path: Path, *, create: bool, limit: int | None):
        self.path = path
        self._thread_lock = threading.Lock()
        flags = os.O_RDWR | os.O_CLOEXEC | (os.O_CREAT if create else 0)
        try:
            self._fd = os.open(path, flags, 0o600)
        except FileNotFoundError:
            raise LedgerNotFound(f"no budget ledger {str(path)!r}") from None
        self._pid = os.getpid()
        self._map = None
        try:
            with self.locked():
                size = os.fstat(self._fd).st_size
                fresh = size == 0 and create
                if fresh:
                    os.ftruncate(self._fd, FILE_BYTES)
                elif size != FILE_BYTES:
                    raise LedgerCorrupt(self._describe_bad(size))
                self._ino = os.fstat(self._fd).st_ino
                self._map = mmap.mmap(self._fd, FILE_BYTES)
                self.header = np.ndarray((), HEADER, self._map, 0)
                self.slots = np.ndarray((SLOTS,), SLOT, self._map, HEADER.itemsize)
                # column views, made once: a field lookup costs more than the lock
                self.limit, self.pid, self.charged = self.header["limit"], self.slots["pid"], self.slots["charged"]
                if fresh:
                    self.header[()] = (MAGIC, VERSION, SLOTS, NO_LIMIT if limit is None else limit, b"")
                self._validate()
        except BaseException:
            self.close()
            raise

    def _describe_bad(self, size: int) -> str:
        head = os.pread(self._fd, HEADER.itemsize, 0)
        if len(head) < 12 or head[:8] != MAGIC:
            return f"{self.path} is not a pyvattn budget ledger (no magic; {size} bytes)"
        version = int.from_bytes(head[8:12], "little")
        if version != VERSION:
            return self._version_message(version)
        return f"{self.path} is {size} bytes, a version-{VERSION} ledger is {FILE_BYTES}: truncated or damaged"

    def _version_message(self, version: int) -> str:
        return (f"{self.path} is a version-{version} budget ledger; this pyvattn reads version {VERSION}. "
                f"Remove it once no process uses it (SharedBudget.remove)")

    def _validate(self) -> None:
        h = self.header
        if bytes(h["magic"]) != MAGIC:
            raise LedgerCorrupt(f"{self.path} is not a pyvattn budget ledger (no magic)")
        if int(h["version"]) != VERSION:
            raise LedgerCorrupt(self._version_message(int(h["version"])))
        if int(h["slots"]) != SLOTS or int(h["limit"]) < NO_LIMIT or (self.slots["charged"] < 0).any():
            raise LedgerCorrupt(f"{self.path}: damaged header or slots (slots={int(h['slots'])}, "
                                f"limit={int(h['limit'])})")

    def locked(self) -> Ledger:
        """``with ledger.locked():`` exclusive against every thread and process using this ledger.

        A plain ``__enter__``/``__exit__`` pair, not a generator: this is every charge's cost."""
        return self

    def check_open(self) -> None:
        if self._fd < 0:
            raise ValueError(f"budget ledger {self.path} is closed in this process")

    def __enter__(self) -> Ledger:
        self.check_open()
        if os.getpid() != self._pid:
            self._reopen_after_fork()
        self._thread_lock.acquire()
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX)
        except BaseException:  # Ctrl-C may land after the kernel granted it: never keep it
            self._unlock()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self._unlock()

    def _unlock(self) -> None:
        """Drop the flock, then the thread lock. An exception (Ctrl-C) at the unlock would leave
        every other process locked out until this one exits: unlock once more, then raise it."""
        try:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        except BaseException:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            raise
        finally:
            self._thread_lock.release()

    def _reopen_after_fork(self) -> None:
        """A forked child shares its parent's open file, and so its flock: open the file anew."""
        inherited = self._fd
        self._fd = os.open(self.path, os.O_RDWR | os.O_CLOEXEC)
        os.close(inherited)
        self._thread_lock = threading.Lock()
        self._pid = os.getpid()
        if os.fstat(self._fd).st_ino != self._ino:
            raise LedgerCorrupt(f"{self.path} was removed and made anew since this process opened it")

    @property
    def closed(self) -> bool:
        return self._fd < 0

    def close(self) -> None:
        """Unmap and close (idempotent); the file stays for the other processes."""
        self.header = self.slots = self.limit = self.pid = self.charged = None
        if self._map is not None:
            try:
                self._map.close()
            except BufferError:  # a view of it still lives (a traceback's frame): unmapped when it dies
                pass
            self._map = None
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

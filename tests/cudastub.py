"""The stand-in libcuda of ``tests/stubs/libcuda_stub.c``, built at test time, and its fixtures.

No GPU here, so the Python side of everything that calls the CUDA driver (the cuda-vmm backend,
the VMM benchmarks) is driven against this small C stand-in. It keeps the state a driver would
and rejects what the real API rejects, so tests check *what pyvattn asks of the driver*. It proves
nothing about the real driver: the GPU tests and benchmarks do that.

Fixtures (import them into a test module to use them):

* ``stub_library``: the compiled stub (skips the test where there is no C compiler);
* ``stub``: a fresh copy of it installed as pyvattn's libcuda for one test, returned as a cffi
  handle on the stub's own counters and switches (``stub_calls``, ``stub_fail_*``...);
* ``stub_path``: the file of that copy.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

SOURCE = Path(__file__).parent / "stubs" / "libcuda_stub.c"

#: The stub's test-only interface (its CUDA entry points are declared by pyvattn._ffi.cuda).
CDEF = """
    extern int stub_calls[16];
    extern int stub_fail_map_after, stub_fail_access, stub_fail_unmap_after;
    extern uint64_t stub_last_sync_before_unmap;
    void stub_set_limit(long pages);
    int stub_live_handles(void);
    int stub_live_mappings(void);
    int stub_accessible_mappings(void);
    int stub_live_reservations(void);
    int stub_ctx_refs(void);
"""
#: Indices into ``stub_calls``.
MAP, ACCESS, UNMAP, CREATE, RELEASE, SYNC, RESERVE, FREE = range(8)
GRAN = 2 << 20


def build(directory: Path) -> Path | None:
    """Compile the stub into ``directory``; its path, or None where no C compiler is installed."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        return None
    out = Path(directory) / "libcuda-stub.so"
    subprocess.run([cc, "-shared", "-fPIC", "-O1", "-pthread", "-o", str(out), str(SOURCE)],
                   check=True, capture_output=True)
    return out


@pytest.fixture(scope="session")
def stub_library(tmp_path_factory) -> Path:
    path = build(tmp_path_factory.mktemp("stubcuda"))
    if path is None:
        pytest.skip("no C compiler to build the stub driver")
    return path


@pytest.fixture
def stub(stub_library, tmp_path, monkeypatch):
    """A fresh stub driver (a copy of the library has its own globals) installed as libcuda."""
    return install(stub_library, tmp_path / "libcuda.so.1", monkeypatch)


def install(library: Path, path: Path, monkeypatch):
    """Copy the stub to ``path`` and install the copy as pyvattn's libcuda (for as long as
    ``monkeypatch`` lasts); return a cffi handle on its counters and switches."""
    from cffi import FFI

    from pyvattn._ffi import cuda
    from pyvattn.backends.cuda_vmm import CudaVmmBackend

    shutil.copy(library, path)
    monkeypatch.setattr(cuda, "_lib", cuda.ffi.dlopen(str(path)))
    monkeypatch.setattr(cuda, "_init_status", None)
    monkeypatch.setattr(CudaVmmBackend, "_granularity", {})
    ffi = FFI()
    ffi.cdef(CDEF)
    return ffi.dlopen(str(path))


@pytest.fixture
def stub_path(stub, tmp_path) -> Path:
    """Where ``stub``'s library lies, for code that loads "the driver" by path (the benchmarks)."""
    return tmp_path / "libcuda.so.1"

"""Lifetimes and faults on the host: stale tensors fault instead of corrupting, reading an
unmapped part reads zeros, pages arrive populated, nothing leaks when construction fails or a
cache is dropped (issue 11, items 5, 6, 7 and 8)."""

from __future__ import annotations

import gc
import os
import resource
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

from books import kv_memfds, vmas_in
from pyvattn import KVCache
from pyvattn.backends.base import graveyard

ARGS = dict(num_layers=1, num_kv_heads=1, head_dim=64, max_batch_size=2, max_seq_len=256,
            dtype=torch.float32, device="cpu", page_size=4096, backend="host")


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=120, cwd=os.path.dirname(__file__))


def test_a_tensor_kept_after_close_faults_instead_of_writing_into_the_next_cache():
    """The review's stale_view_after_close: the next cache got the same addresses and the stale
    tensor wrote into it. Now the range stays reserved and sealed while the view lives."""
    proc = _run("""
        import torch
        from pyvattn import KVCache
        args = dict(num_layers=1, num_kv_heads=1, head_dim=64, max_batch_size=2, max_seq_len=256,
                    dtype=torch.float32, device="cpu", page_size=4096, backend="host")
        a = KVCache(**args)
        s = a.alloc_slot(); a.step({s: 16})
        stale = a.k[0]
        a.close()
        b = KVCache(**args)
        t = b.alloc_slot(); b.step({t: 16}); b.k[0][t, :16] = 1.0
        assert stale.data_ptr() != b.k[0].data_ptr(), "the closed range was reused"
        print("writing through the stale tensor", flush=True)
        stale[t, :16] = 42.0
        print("not reached: cache b holds", b.k[0][t, 0, 0, 0].item(), flush=True)
    """)
    assert "writing through the stale tensor" in proc.stdout and "not reached" not in proc.stdout
    assert proc.returncode == -signal.SIGSEGV, proc.stderr


def test_a_closed_range_is_given_back_once_its_last_view_dies():
    cache = KVCache(**ARGS)
    slot = cache.alloc_slot()
    cache.step({slot: 100})
    view = cache.v[0][slot]
    base, nbytes = cache.buffer.base, cache.buffer.nbytes
    backend = cache.backend
    cache.close()
    assert backend.allocated_bytes() == 0  # the memory went back at once...
    assert [p for _, _, p in vmas_in(base, base + nbytes)] == ["---p"]  # ...the range is sealed
    del view
    gc.collect()
    graveyard.sweep()  # also done by every reserve()
    assert vmas_in(base, base + nbytes) == [] and backend._fd == -1


def test_reading_unmapped_tokens_reads_zeros_and_printing_a_tensor_is_safe():
    """The review: print(cache.k[0]) killed the interpreter (torch's repr reads the corners)."""
    with KVCache(**ARGS) as cache:
        slot = cache.alloc_slot()
        cache.step({slot: 10})
        cache.k[0][slot, :10] = 3.0
        text = repr(cache.k[0])  # reads mapped and unmapped pages alike
        assert "3." in text and "0." in text
        assert float(cache.k[0][1 - slot].abs().sum()) == 0.0  # a slot with nothing mapped
        assert float(cache.k[0][slot, 200].abs().sum()) == 0.0


def test_writing_an_unmapped_token_still_faults():
    proc = _run("""
        import torch
        from pyvattn import KVCache
        c = KVCache(1, 1, 64, 2, 256, torch.float32, device="cpu", page_size=4096, backend="host")
        s = c.alloc_slot(); c.step({s: 10})
        print(c.k[0][s, 200].sum().item(), flush=True)
        c.k[0][s, 200] = 1.0
        print("not reached", flush=True)
    """)
    assert proc.stdout.startswith("0.0") and "not reached" not in proc.stdout
    assert proc.returncode == -signal.SIGSEGV, proc.stderr


def test_pages_arrive_populated_so_the_first_write_takes_no_page_faults():
    """The review's first_touch_faults: one minor fault per 4 KiB on the first write after step()
    (262,157 per GiB). MAP_POPULATE on the mapping thread takes them there instead."""
    with KVCache(4, 8, 128, 4, 1024, torch.float16, device="cpu", page_size="64KiB") as cache:
        slots = [cache.alloc_slot() for _ in range(4)]
        cache.step({s: 1024 for s in slots})  # 16 MiB: 4096 OS pages
        x = torch.ones(1024, 8, 128, dtype=torch.float16)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for layer in range(4):
            for s in slots:
                cache.k[layer][s] = x
                cache.v[layer][s] = x
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
        assert faults < 100, f"{faults} minor faults writing 4096 freshly mapped OS pages"


@pytest.mark.parametrize("where", ["PagePool", "Slabs", "CacheStats", "view"])
@pytest.mark.parametrize("error", [KeyboardInterrupt, MemoryError])
def test_a_failure_during_construction_leaks_nothing(monkeypatch, where, error):
    """The review's init_failure_leak: a failure after the buffer existed leaked the memfd and the
    reservation (5 of each after 5 tries)."""
    import pyvattn.kvcache as kv
    from pyvattn.buffer import VirtualBuffer

    def fail(*args, **kwargs):
        raise error("injected")

    target = (VirtualBuffer, "view") if where == "view" else (kv, where)
    monkeypatch.setattr(*target, fail)
    fds, maps = kv_memfds(), _reservations()
    for _ in range(3):
        with pytest.raises(error):
            KVCache(**ARGS)
    gc.collect()
    graveyard.sweep()
    assert kv_memfds() == fds and _reservations() == maps


def _reservations() -> int:
    """Read-only private mappings of 2 MiB or more: what a host reservation looks like."""
    n = 0
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split()
            lo, hi = (int(x, 16) for x in parts[0].split("-"))
            n += parts[1] in ("r--p", "---p") and hi - lo >= 2 << 20 and len(parts) == 5
    return n


def test_a_dropped_cache_warns_and_returns_everything():
    fds = kv_memfds()
    cache = KVCache(**ARGS)
    slot = cache.alloc_slot()
    cache.step({slot: 100})
    with pytest.warns(ResourceWarning, match="unclosed KVCache"):
        del cache
        gc.collect()
    assert kv_memfds() == fds


def test_a_failing_close_in_del_is_reported_not_swallowed(monkeypatch):
    cache = KVCache(**ARGS)
    backend = cache.backend

    def broken_close():
        raise RuntimeError("injected close failure")

    monkeypatch.setattr(backend, "close", broken_close)
    with pytest.warns(ResourceWarning) as record:
        del cache
        gc.collect()
    assert any("injected close failure" in str(w.message) for w in record)
    type(backend).close(backend)


def test_a_forked_child_cannot_use_the_cache_and_takes_nothing_from_the_parent():
    """The child shares the memfd with the parent: had it used the cache, or released its pages
    when its copy was collected (punching holes in the shared file), the parent's KV data would be
    gone."""
    from kvdata import check, write

    cache = KVCache(2, 1, 64, 4, 256, torch.float32, device="cpu", page_size=4096, backend="host")
    try:
        slot = cache.alloc_slot()
        cache.step({slot: 100})
        write(cache, slot, 5, 0, 100)
        blocks = cache.backend.allocated_bytes()
        pid = os.fork()
        if pid == 0:  # the child: report through the exit status only
            code = 0
            try:
                cache.step({slot: 200})
                code = 1
            except RuntimeError as exc:
                code = 0 if "forked child" in str(exc) else 2
            del cache
            gc.collect()
            os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert cache.backend.allocated_bytes() == blocks
        check(cache, slot, 5, 100)
        cache.step({slot: 200})  # the parent goes on
        write(cache, slot, 5, 100, 200)
        check(cache, slot, 5, 200)
    finally:
        cache.close()

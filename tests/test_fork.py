"""KVCache.fork (issue 14, item 2): a new slot whose prefix is another's, its whole pages the same
physical pages in every layer's K and V, the partial last page copied; writes after the fork
private to each slot; attention over forked slots equal to a float64 reference; either slot freed
first; an exception at every call index."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from books import check_cache
from faults import BACKEND_CALLS, HOST_DRIVER_CALLS, POOL_CALLS, ForkWorkload, libc_fails_like_the_os, sweep
from pyvattn import KVCache, OutOfSlots, attention
from pyvattn._ffi import libc
from test_attention import assert_close, capture_decode, reference

HAS_CUDA = torch.cuda.is_available()

# (backend, device, kv_heads, head_dim, dtype, page_size, max_seq_len): 16 tokens per page on the
# host; on cuda-vmm 2 MiB pages hold 1,024 tokens of 8 heads x 128 x fp16
CONFIGS = [
    pytest.param(("host", "cpu", 2, 32, torch.float32, 4096, 256), id="host"),
    pytest.param(("cuda-vmm", "cuda", 8, 128, torch.float16, 2 << 20, 4096), id="cuda-vmm", marks=[
        pytest.mark.gpu, pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device visible to torch")]),
]


def _cache(config, slots: int = 4, **kw) -> KVCache:
    backend, device, heads, dim, dtype, page, max_len = config
    return KVCache(2, heads, dim, slots, max_len, dtype, device=device, page_size=page, backend=backend, **kw)


def _tpp(cache) -> int:
    return cache.page_size // cache.token_bytes


class Written:
    """What the test wrote into each slot, kept on the CPU in float64: the reference."""

    def __init__(self, cache, seed: int = 0):
        self.cache, self.gen = cache, torch.Generator().manual_seed(seed)
        self.kv: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}

    def write(self, slot: int, start: int, stop: int) -> None:
        c = self.cache
        layers = self.kv.setdefault(slot, [(torch.zeros(0, c.num_kv_heads, c.head_dim, dtype=torch.float64),) * 2
                                           for _ in range(c.num_layers)])
        for layer in range(c.num_layers):
            new = [torch.randn(stop - start, c.num_kv_heads, c.head_dim, generator=self.gen).to(c.dtype)
                   for _ in range(2)]
            c.k[layer][slot, start:stop] = new[0].to(c.device)
            c.v[layer][slot, start:stop] = new[1].to(c.device)
            k, v = layers[layer]
            assert len(k) == start
            layers[layer] = (torch.cat([k, new[0].double()]), torch.cat([v, new[1].double()]))

    def fork(self, dst: int, src: int, n: int) -> None:
        self.kv[dst] = [(k[:n].clone(), v[:n].clone()) for k, v in self.kv[src]]

    def check(self, slot: int) -> None:
        for layer, (k, v) in enumerate(self.kv[slot]):
            n = len(k)
            assert torch.equal(self.cache.k[layer][slot, :n].cpu().double(), k), f"slot {slot} layer {layer} K"
            assert torch.equal(self.cache.v[layer][slot, :n].cpu().double(), v), f"slot {slot} layer {layer} V"


def _handles(cache, slot: int, pages: int) -> np.ndarray:
    """[regions, pages] handles under the first ``pages`` pages of ``slot``."""
    s = cache._slabs
    vas = s.vas(np.array([slot]), np.zeros(1, np.int64), np.array([pages]))
    return cache.backend.handles_at(vas).reshape(cache.num_regions, pages)


@pytest.mark.parametrize("config", CONFIGS)
def test_fork_shares_whole_pages_copies_the_last_and_keeps_writes_private(config):
    with _cache(config) as cache:
        tpp, data = _tpp(cache), Written(cache)
        a = cache.alloc_slot()
        cache.step({a: 3 * tpp + 5})
        data.write(a, 0, 3 * tpp + 5)
        n = 2 * tpp + 7  # two whole pages and part of a third
        b = cache.fork(a, n)
        data.fork(b, a, n)
        assert b != a and cache.seq_len(b) == n and cache.cached_tokens(b) == n
        ha, hb = _handles(cache, a, 3), _handles(cache, b, 3)
        assert (ha[:, :2] == hb[:, :2]).all(), "a whole page of the prefix is not the same physical page"
        assert not np.isin(hb[:, 2], ha).any(), "the partial last page must be the new slot's own"
        assert cache.stats()["shared_pages"] == 2 * cache.num_regions
        data.check(a), data.check(b)
        # both grow and write past the fork: each one's tokens stay its own
        cache.step({a: 5 * tpp, b: 4 * tpp + 3})
        data.write(a, 3 * tpp + 5, 5 * tpp)
        data.write(b, n, 4 * tpp + 3)
        data.check(a), data.check(b)
        if cache.backend.name == "host":
            check_cache(cache)


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("first", ["source", "fork"])
@pytest.mark.parametrize("deferred", [True, False], ids=["deferred", "eager"])
def test_either_slot_freed_first_leaves_the_other_whole(config, first, deferred):
    with _cache(config, deferred_reclaim=deferred) as cache:
        tpp, data = _tpp(cache), Written(cache)
        a = cache.alloc_slot()
        cache.step({a: 4 * tpp})
        data.write(a, 0, 4 * tpp)
        b = cache.fork(a, 3 * tpp)
        data.fork(b, a, 3 * tpp)
        cache.step({b: 3 * tpp + 9})
        data.write(b, 3 * tpp, 3 * tpp + 9)
        gone, kept = (a, b) if first == "source" else (b, a)
        physical = cache.pool.total_pages - cache.pool.free_pages
        cache.free_slot(gone)
        if not deferred:  # only the freed slot's own page came back: the shared three stay
            assert cache.pool.total_pages - cache.pool.free_pages == physical - cache.num_regions
        cache.trim()
        data.check(kept)
        assert cache.stats()["shared_pages"] == 0
        # a new request may now take the freed slot and write from token 0: kept's data stays
        c = cache.alloc_slot(seq_len=4 * tpp)
        cache.step({c: 4 * tpp})
        data.kv.pop(c, None)
        data.write(c, 0, 4 * tpp)
        data.check(kept), data.check(c)
        if cache.backend.name == "host":
            check_cache(cache)
        cache.free_slot(kept)
        cache.free_slot(c)
        assert cache.trim() > 0 and cache.pool.total_pages == 0
        if cache.backend.name == "host":
            assert cache.backend.allocated_bytes() == 0


def test_a_new_request_in_a_slot_holding_shared_pages_never_writes_them():
    """A finished fork's slot still maps the source's pages (deferred reclaim): the request that
    takes it next writes from token 0, so those mappings go first; the source keeps its data."""
    with _cache(CONFIGS[0].values[0]) as cache:
        tpp, data = _tpp(cache), Written(cache)
        a = cache.alloc_slot()
        cache.step({a: 4 * tpp})
        data.write(a, 0, 4 * tpp)
        b = cache.fork(a, 4 * tpp)
        cache.free_slot(b)
        for _ in range(cache.max_batch_size - 1):  # every free slot taken: b's one too
            s = cache.alloc_slot(seq_len=4 * tpp)
            cache.step({s: 4 * tpp})
            data.kv.pop(s, None)
            data.write(s, 0, 4 * tpp)
        data.check(a)
        assert cache.stats()["shared_pages"] == 0
        check_cache(cache)


def test_fork_refuses_bad_input_and_a_full_cache_without_changing_anything():
    with _cache(CONFIGS[0].values[0], slots=2) as cache:
        a = cache.alloc_slot()
        cache.step({a: 20})
        for bad, match in (((5, 1), "src_slot=5"), ((1, 1), "src_slot=1 is not allocated"),
                           ((a, 21), "num_tokens=21"), ((a, -1), "num_tokens=-1"), ((a, True), "num_tokens=True"),
                           ((a, 2.0), "num_tokens=2.0")):
            with pytest.raises(ValueError, match=match):
                cache.fork(*bad)
        b = cache.fork(a, 0)  # nothing shared: an empty slot
        assert cache.seq_len(b) == 0 and cache.slot_mapped_bytes(b) == 0
        with pytest.raises(OutOfSlots):
            cache.fork(a, 10)
        check_cache(cache)


@pytest.mark.parametrize("config", CONFIGS)
def test_attention_over_forked_slots_equals_the_float64_reference(config):
    """Decode, prefill (stored into a fork) and chunked prefill over a source and two forks."""
    with _cache(config) as cache:
        tpp, data = _tpp(cache), Written(cache)
        dev, dt, H, D = cache.device, cache.dtype, cache.num_kv_heads, cache.head_dim
        gen = torch.Generator().manual_seed(1)
        a = cache.alloc_slot()
        cache.step({a: 2 * tpp + 3})
        data.write(a, 0, 2 * tpp + 3)
        b, c = cache.fork(a, 2 * tpp + 3), cache.fork(a, tpp)
        data.fork(b, a, 2 * tpp + 3), data.fork(c, a, tpp)
        # chunked prefill of new tokens into each fork, attending to the shared prefix
        new = {b: 5, c: tpp + 2}
        cache.step({s: cache.seq_len(s) + n for s, n in new.items()})
        for s, n in new.items():
            start = len(data.kv[s][0][0])
            data.write(s, start, start + n)
        slots = list(new)
        lens = [len(data.kv[s][0][0]) for s in slots]
        cu = [0, new[b], new[b] + new[c]]
        for layer in range(cache.num_layers):
            q = torch.randn(cu[-1], 2 * H, D, generator=gen).to(dt)
            got = attention.prefill_with_cache(q.to(dev), cache.k[layer], cache.v[layer], cu, lens, slots=slots)
            for i, s in enumerate(slots):
                k, v = data.kv[s][layer]
                want = reference(q[cu[i]:cu[i + 1]], k, v, D ** -0.5, lens[i] - new[s])
                assert_close(got[cu[i]:cu[i + 1]], want, dt)
        # a decode step over all three
        every = [a, b, c]
        cache.step({s: len(data.kv[s][0][0]) + 1 for s in every})
        for s in every:
            n = len(data.kv[s][0][0])
            data.write(s, n, n + 1)
        lens = [len(data.kv[s][0][0]) for s in every]
        for layer in range(cache.num_layers):
            q = torch.randn(3, 1, 2 * H, D, generator=gen).to(dt)
            got = attention.decode(q.to(dev), cache.k[layer], cache.v[layer], lens, slots=every)
            for i, s in enumerate(every):
                k, v = data.kv[s][layer]
                assert_close(got[i, 0], reference(q[i, 0:1], k, v, D ** -0.5, None)[0], dt)
        for s in every:
            data.check(s)


# --- an exception at every call index ---------------------------------------------------------------
P = 4096


def _fork_cache(deferred: bool = True) -> KVCache:
    # 256 B per token: 16 tokens per page; 2 layers: 4 regions; a budget the workload fills
    return KVCache(2, 1, 64, 4, 256, torch.float32, device="cpu", page_size=P, backend="host",
                   memory_budget=64 * P, deferred_reclaim=deferred)


def _host_closed(backend) -> None:
    assert backend._fd == -1 and not backend._tables


def _host_driver(mp, cache, injector):
    injector.install(mp, libc, HOST_DRIVER_CALLS)


def _backend_and_pool(mp, cache, injector):
    injector.install(mp, cache.backend, BACKEND_CALLS)
    injector.install(mp, cache.pool, POOL_CALLS)


def test_the_fork_workload_shares_reuses_and_reclaims_when_nothing_fails():
    cache = _fork_cache()
    work = ForkWorkload(cache)
    work.run()
    work.check_data()
    check_cache(cache)
    st = cache.stats()
    assert st["forks"] == 2 and st["prefix_hits"] == 2 and st["shared_pages"] == 5 * cache.num_regions
    assert st["prefix_tokens_saved"] == 64 + 80
    work.finish()
    check_cache(cache)
    cache.close()


@pytest.mark.parametrize("deferred", [True, False], ids=["deferred", "eager"])
def test_keyboard_interrupt_at_every_driver_call_of_the_fork_workload(deferred):
    assert sweep(lambda: _fork_cache(deferred), _host_driver, error=KeyboardInterrupt(),
                 after_close=_host_closed, workload=ForkWorkload) > 20


def test_enomem_at_every_driver_call_of_the_fork_workload():
    assert sweep(_fork_cache, _host_driver, fail=libc_fails_like_the_os, after_close=_host_closed,
                 workload=ForkWorkload) > 20


def test_every_driver_call_failing_from_some_point_on_in_the_fork_workload():
    assert sweep(_fork_cache, _host_driver, error=KeyboardInterrupt(), persistent=True,
                 after_close=_host_closed, workload=ForkWorkload) > 20


def test_keyboard_interrupt_at_every_backend_and_pool_call_of_the_fork_workload():
    assert sweep(_fork_cache, _backend_and_pool, error=KeyboardInterrupt(), after_close=_host_closed,
                 workload=ForkWorkload) > 10


def test_a_driver_cap_on_mappings_per_page_refuses_a_fork_and_prefix_reuse_falls_back():
    """uvm64k's module maps one page at most ``maxMappingsPerPage`` (16) times; the host has no cap,
    so one is set here. A fork past it is refused with nothing changed; prefix reuse recomputes."""
    with _cache(CONFIGS[0].values[0]) as cache:
        cache.backend.max_mappings = 2
        prompt = np.arange(64)
        a = cache.alloc_slot(tokens=prompt)
        cache.step({a: 64})
        cache.fork(a, 40)
        with pytest.raises(ValueError, match="the most"):
            cache.fork(a, 40)
        assert cache._slots.active.sum() == 2
        check_cache(cache)
        c = cache.alloc_slot(tokens=prompt)
        assert cache.cached_tokens(c) == 0 and cache.stats()["prefix_hits"] == 0
        check_cache(cache)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device visible to torch")
def test_cuda_graph_captured_before_a_fork_keeps_working_over_the_forked_slot():
    """A decode step captured over slots 0 and 1; then slot 1's request finishes and slot 0 is
    forked into it (the source's pages mapped under slot 1's addresses): replaying the graph gives
    the reference answer over the shared prefix, with nothing re-captured."""
    import math

    from test_attention import _rand

    hkv, hq, D = 8, 32, 128  # 2 KiB per token: 1024 tokens per 2 MiB page
    if attention.backend_name("cuda", dtype=torch.float16, head_dim=D) == "sdpa":
        pytest.skip("the SDPA path reads lengths on the host, which a CUDA graph cannot capture")
    gen = torch.Generator().manual_seed(5)
    with KVCache(1, hkv, D, max_batch_size=2, max_seq_len=4096, dtype=torch.float16, device="cuda",
                 backend="cuda-vmm") as cache:
        a, c = cache.alloc_slot(), cache.alloc_slot()
        lens = [2100, 7]
        cache.step({a: lens[0], c: lens[1]})
        for s, n in zip((a, c), lens):
            cache.k[0][s, :n] = _rand((n, hkv, D), torch.float16, "cuda", gen)
            cache.v[0][s, :n] = _rand((n, hkv, D), torch.float16, "cuda", gen)
        slot_t = torch.tensor([a, c], dtype=torch.int32, device="cuda")
        pos = torch.tensor([n - 1 for n in lens], device="cuda")
        seqlens = torch.tensor(lens, dtype=torch.int32, device="cuda")
        q = _rand((2, 1, hq, D), torch.float16, "cuda", gen)
        kv_new = cache.k[0][slot_t.long(), pos].clone()
        graph, out = capture_decode(cache, q, kv_new, pos, seqlens, slot_t)
        torch.cuda.synchronize()

        cache.free_slot(c)
        b = cache.fork(a, 2050)  # two whole pages shared, the rest of the third copied
        assert b == c and cache.stats()["shared_pages"] == 2 * cache.num_regions
        prefix_k = cache.k[0][a, :2050].clone()
        lens = [2100, 2050]
        for _ in range(4):
            lens = [n + 1 for n in lens]
            cache.step(dict(zip((a, b), lens)))
            kv_new.copy_(_rand((2, hkv, D), torch.float16, "cuda", gen))
            q.copy_(_rand((2, 1, hq, D), torch.float16, "cuda", gen))
            pos.copy_(torch.tensor([n - 1 for n in lens]))
            seqlens.copy_(torch.tensor(lens, dtype=torch.int32))
            graph.replay()
            torch.cuda.synchronize()
            for i, (s, n) in enumerate(zip((a, b), lens)):
                want = reference(q[i], cache.k[0][s, :n], cache.v[0][s, :n], 1 / math.sqrt(D), None)
                assert_close(out[i], want, torch.float16)
        assert torch.equal(cache.k[0][b, :2050], prefix_k) and torch.equal(cache.k[0][a, :2050], prefix_k)


def test_bench_prefix_runs_small_and_refuses_bad_arguments_with_exit_2(tmp_path, capsys):
    import json
    import runpy
    import sys
    from pathlib import Path

    scripts = Path(__file__).resolve().parents[1] / "scripts"
    sys.path.insert(0, str(scripts))
    try:
        main = runpy.run_path(str(scripts / "bench_prefix.py"))["main"]
    finally:
        sys.path.remove(str(scripts))
    out = tmp_path / "p.json"
    assert main(["--layers", "1", "--prefix", "70", "--repeat", "1", "--out", str(out)]) == 0
    run = json.loads(out.read_text())["runs"][0]
    assert run["new_bytes"]["hit"] == 0 and run["new_bytes"]["fork"] < run["new_bytes"]["copy"]
    for argv in (["--prefix", "0"], ["--page-size", "big"], ["--page-size", "1000"], ["--repeat", "0"]):
        with pytest.raises(SystemExit) as exc:
            main([*argv, "--out", str(out)])
        assert exc.value.code == 2

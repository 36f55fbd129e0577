"""pyvattn.attention against a plain float64 reference: every path, GQA, ragged batches."""

from __future__ import annotations

import math

import pytest
import torch

from pyvattn import KVCache, attention

TOL = {torch.float32: 2e-5, torch.float16: 3e-3, torch.bfloat16: 2.5e-2}
HAS_CUDA = torch.cuda.is_available()

# (device, impl) pairs: CPU SDPA always; CUDA SDPA and flash-attn where they can run.
PATHS = [
    pytest.param("cpu", "sdpa", id="cpu-sdpa"),
    pytest.param("cuda", "sdpa", id="cuda-sdpa", marks=[
        pytest.mark.gpu, pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device visible to torch")]),
    pytest.param("cuda", "flash", id="cuda-flash", marks=[
        pytest.mark.gpu, pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device visible to torch"),
        pytest.mark.skipif(not attention.flash_available(), reason="flash-attn is not installed")]),
    pytest.param("cuda", "torch-flash", id="cuda-torch-flash", marks=[
        pytest.mark.gpu, pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device visible to torch"),
        pytest.mark.skipif(HAS_CUDA and not attention.torch_flash_available(),
                           reason="this torch build or GPU has no FlashAttention kernels")]),
]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, first_visible: int | None):
    """Attention of ``q [n, Hq, D]`` over ``k/v [L, Hkv, D]`` in float64, written out plainly.

    Query ``j`` sees keys ``0 .. first_visible + j`` (``None``: all keys)."""
    q, k, v = q.double().cpu(), k.double().cpu(), v.double().cpu()
    n, hq, _ = q.shape
    L, hkv, _ = k.shape
    group = hq // hkv
    out = torch.zeros(n, hq, v.shape[-1], dtype=torch.float64)
    for j in range(n):
        last = L - 1 if first_visible is None else first_visible + j
        for h in range(hq):
            kh, vh = k[: last + 1, h // group], v[: last + 1, h // group]
            scores = (kh @ q[j, h]) * scale
            weights = torch.exp(scores - scores.max())
            out[j, h] = (weights / weights.sum()) @ vh
    return out


def assert_close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> None:
    err = (got.double().cpu() - want).abs().max().item()
    assert err <= TOL[dtype], f"max abs error {err:.3g} > {TOL[dtype]:.3g} for {dtype}"


def skip_unsupported(impl, dtype):
    """The flash paths have no fp32 kernels: asking for one must be a clear error, then nothing to test."""
    if impl in ("flash", "torch-flash") and dtype == torch.float32:
        with pytest.raises(ValueError, match="fp16/bf16"):
            attention.backend_name("cuda", impl=impl, dtype=dtype)
        pytest.skip(f"{impl} runs fp16/bf16 only")


def capture_decode(cache, q, kv_new, pos, seqlens, slot_t):
    """A CUDA graph of one decode step of layer 0 (write ``kv_new`` at ``pos`` of each slot in
    ``slot_t``, then attention over ``seqlens``), warmed up on a side stream as CUDA graphs need;
    (graph, its output tensor). Replays read the tensors' current contents."""
    slot_l = slot_t.long()

    def forward():
        cache.k[0][slot_l, pos] = kv_new
        cache.v[0][slot_l, pos] = kv_new
        return attention.decode(q, cache.k[0], cache.v[0], seqlens, slots=slot_t)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        forward()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = forward()
    return graph, out


def _rand(shape, dtype, device, gen):
    return torch.randn(shape, generator=gen, dtype=torch.float32).to(dtype=dtype, device=device)


@pytest.mark.parametrize("device,impl", PATHS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hq,hkv", [(4, 4), (8, 2), (6, 1)])
def test_decode_matches_reference(device, impl, dtype, hq, hkv):
    skip_unsupported(impl, dtype)
    gen = torch.Generator().manual_seed(hq * 10 + hkv)
    D, max_batch, max_seq = 64, 5, 300
    kc = _rand((max_batch, max_seq, hkv, D), dtype, device, gen)
    vc = _rand((max_batch, max_seq, hkv, D), dtype, device, gen)
    lens, slots = [1, 300, 77, 128], [4, 0, 2, 1]
    q = _rand((4, 1, hq, D), dtype, device, gen)
    out = attention.decode(q, kc, vc, torch.tensor(lens, dtype=torch.int32, device=device),
                           slots=torch.tensor(slots, dtype=torch.int32, device=device), impl=impl)
    assert out.shape == q.shape and out.dtype == dtype and out.device == q.device
    for b, (s, n) in enumerate(zip(slots, lens)):
        assert_close(out[b], reference(q[b], kc[s, :n], vc[s, :n], 1 / math.sqrt(D), None), dtype)


@pytest.mark.parametrize("device,impl", PATHS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_decode_default_slots_and_custom_scale(device, impl, dtype):
    skip_unsupported(impl, dtype)
    gen = torch.Generator().manual_seed(7)
    kc, vc = _rand((3, 40, 2, 32), dtype, device, gen), _rand((3, 40, 2, 32), dtype, device, gen)
    q = _rand((3, 1, 4, 32), dtype, device, gen)
    out = attention.decode(q, kc, vc, [40, 3, 19], softmax_scale=0.3, impl=impl)
    for b, n in enumerate([40, 3, 19]):
        assert_close(out[b], reference(q[b], kc[b, :n], vc[b, :n], 0.3, None), dtype)


@pytest.mark.parametrize("device,impl", PATHS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hq,hkv", [(4, 4), (8, 2)])
def test_prefill_matches_reference(device, impl, dtype, hq, hkv):
    skip_unsupported(impl, dtype)
    gen = torch.Generator().manual_seed(3)
    lens = [5, 1, 33, 0, 64]
    cu = [0]
    for n in lens:
        cu.append(cu[-1] + n)
    T, D = cu[-1], 64
    q, k, v = (_rand((T, h, D), dtype, device, gen) for h in (hq, hkv, hkv))
    out = attention.prefill(q, k, v, torch.tensor(cu, dtype=torch.int32, device=device), impl=impl)
    assert out.shape == q.shape and out.dtype == dtype
    for a, b in zip(cu[:-1], cu[1:]):
        if b > a:
            assert_close(out[a:b], reference(q[a:b], k[a:b], v[a:b], 1 / math.sqrt(D), 0), dtype)


@pytest.mark.parametrize("device,impl", PATHS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_prefill_with_cache_is_causal_from_the_end(device, impl, dtype):
    skip_unsupported(impl, dtype)
    gen = torch.Generator().manual_seed(11)
    hq, hkv, D = 8, 2, 64
    kc, vc = _rand((4, 200, hkv, D), dtype, device, gen), _rand((4, 200, hkv, D), dtype, device, gen)
    new = [7, 1, 30]  # new tokens per request
    total = [7, 150, 95]  # first one is a fresh prompt; the others have a cached prefix
    slots = [3, 1, 0]
    cu = [0, 7, 8, 38]
    q = _rand((cu[-1], hq, D), dtype, device, gen)
    out = attention.prefill_with_cache(q, kc, vc, cu, total, slots=slots, impl=impl)
    for b in range(3):
        a, e = cu[b], cu[b + 1]
        want = reference(q[a:e], kc[slots[b], :total[b]], vc[slots[b], :total[b]], 1 / math.sqrt(D),
                         total[b] - new[b])
        assert_close(out[a:e], want, dtype)


def test_prefill_then_decode_through_a_host_kvcache():
    """The whole flow on real pyvattn memory: step, store prompt K/V, prefill, then decode steps.
    Lengths end exactly on page boundaries, so a read past any request's length would hit a
    PROT_NONE page and crash this test."""
    L, hkv, hq, D = 2, 2, 8, 16  # 2*16*4 B = 128 B per token: 32 tokens per 4 KiB page
    with KVCache(L, hkv, D, max_batch_size=4, max_seq_len=256, dtype=torch.float32, device="cpu",
                 backend="host", page_size=4096) as cache:
        gen = torch.Generator().manual_seed(5)
        slots = [cache.alloc_slot() for _ in range(3)]
        prompt = [32, 63, 96]
        cache.step({s: n for s, n in zip(slots, prompt)})
        cu = [0, 32, 95, 191]
        for layer in range(L):
            k = torch.randn(cu[-1], hkv, D, generator=gen)
            v = torch.randn(cu[-1], hkv, D, generator=gen)
            q = torch.randn(cu[-1], hq, D, generator=gen)
            attention.store_kv(cache.k[layer], cache.v[layer], k, v, cu, [0, 0, 0], slots=slots)
            out = attention.prefill(q, k, v, cu)
            cached = attention.prefill_with_cache(q, cache.k[layer], cache.v[layer], cu, prompt, slots=slots)
            for b in range(3):
                a, e = cu[b], cu[b + 1]
                want = reference(q[a:e], k[a:e], v[a:e], 1 / math.sqrt(D), 0)
                assert_close(out[a:e], want, torch.float32)
                assert_close(cached[a:e], want, torch.float32)
        lens = list(prompt)
        for _ in range(3):  # decode: grow by one token, write it, attend
            lens = [n + 1 for n in lens]
            cache.step({s: n for s, n in zip(slots, lens)})
            for layer in range(L):
                kc, vc = cache.k[layer], cache.v[layer]
                for s, n in zip(slots, lens):
                    kc[s, n - 1] = torch.randn(hkv, D, generator=gen)
                    vc[s, n - 1] = torch.randn(hkv, D, generator=gen)
                q = torch.randn(3, 1, hq, D, generator=gen)
                out = attention.decode(q, kc, vc, torch.tensor(lens, dtype=torch.int32),
                                       slots=torch.tensor(slots, dtype=torch.int32))
                for b, (s, n) in enumerate(zip(slots, lens)):
                    assert_close(out[b], reference(q[b], kc[s, :n], vc[s, :n], 1 / math.sqrt(D), None),
                                 torch.float32)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device visible to torch")
@pytest.mark.parametrize("impl", ["auto", "sdpa", "torch-flash"])
def test_decode_on_a_cuda_kvcache(impl):
    """Decode on real cuda-vmm (or uvm64k, via auto) pages: lengths end on 2 MiB page boundaries."""
    hkv, hq, D = 8, 32, 128  # 8*128*2 B = 2 KiB per token: 1024 tokens per 2 MiB page
    if impl == "torch-flash" and not attention.torch_flash_available():
        pytest.skip("this torch build or GPU has no FlashAttention kernels")
    with KVCache(1, hkv, D, max_batch_size=3, max_seq_len=4096, dtype=torch.float16, device="cuda") as cache:
        slots = [cache.alloc_slot() for _ in range(3)]
        lens = [1024, 2048, 5]
        cache.step({s: n for s, n in zip(slots, lens)})
        gen = torch.Generator().manual_seed(9)
        for s, n in zip(slots, lens):
            cache.k[0][s, :n] = _rand((n, hkv, D), torch.float16, "cuda", gen)
            cache.v[0][s, :n] = _rand((n, hkv, D), torch.float16, "cuda", gen)
        q = _rand((3, 1, hq, D), torch.float16, "cuda", gen)
        out = attention.decode(q, cache.k[0], cache.v[0], torch.tensor(lens, dtype=torch.int32, device="cuda"),
                               slots=torch.tensor(slots, dtype=torch.int32, device="cuda"), impl=impl)
        torch.cuda.synchronize()
        for b, (s, n) in enumerate(zip(slots, lens)):
            want = reference(q[b], cache.k[0][s, :n], cache.v[0][s, :n], 1 / math.sqrt(D), None)
            assert_close(out[b], want, torch.float16)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device visible to torch")
def test_cuda_graph_captured_before_growth_keeps_working_as_pages_are_mapped():
    """A decode step captured in a CUDA graph while a request has one page keeps giving the right
    answer after the cache maps more pages under the same addresses: nothing is re-captured."""
    hkv, hq, D = 8, 32, 128  # 2 KiB per token: 1024 tokens per 2 MiB page
    if attention.backend_name("cuda", dtype=torch.float16, head_dim=D) == "sdpa":
        pytest.skip("the SDPA path reads lengths on the host, which a CUDA graph cannot capture")
    gen = torch.Generator().manual_seed(3)
    with KVCache(1, hkv, D, max_batch_size=2, max_seq_len=4096, dtype=torch.float16, device="cuda") as cache:
        slots = [cache.alloc_slot() for _ in range(2)]
        lens = [1020, 5]
        cache.step(dict(zip(slots, lens)))
        for s, n in zip(slots, lens):
            cache.k[0][s, :n] = _rand((n, hkv, D), torch.float16, "cuda", gen)
            cache.v[0][s, :n] = _rand((n, hkv, D), torch.float16, "cuda", gen)
        maps_before = cache.stats()["map_calls"]
        slot_t = torch.tensor(slots, dtype=torch.int32, device="cuda")
        slot_l = slot_t.long()
        pos = torch.tensor([n - 1 for n in lens], device="cuda")
        seqlens = torch.tensor(lens, dtype=torch.int32, device="cuda")
        q = _rand((2, 1, hq, D), torch.float16, "cuda", gen)
        kv_new = cache.k[0][slot_l, pos].clone()  # rewriting the last prompt token: a valid step
        graph, out = capture_decode(cache, q, kv_new, pos, seqlens, slot_t)

        for _ in range(8):  # request 0 crosses into its second page at token 1025
            lens = [n + 1 for n in lens]
            cache.step(dict(zip(slots, lens)))
            kv_new.copy_(_rand((2, hkv, D), torch.float16, "cuda", gen))
            q.copy_(_rand((2, 1, hq, D), torch.float16, "cuda", gen))
            pos.copy_(torch.tensor([n - 1 for n in lens]))
            seqlens.copy_(torch.tensor(lens, dtype=torch.int32))
            graph.replay()
            torch.cuda.synchronize()
            for b, (s, n) in enumerate(zip(slots, lens)):
                assert torch.equal(cache.k[0][s, n - 1], kv_new[b]) and torch.equal(cache.v[0][s, n - 1], kv_new[b])
                want = reference(q[b], cache.k[0][s, :n], cache.v[0][s, :n], 1 / math.sqrt(D), None)
                assert_close(out[b], want, torch.float16)
        assert cache.stats()["map_calls"] > maps_before  # pages were mapped under the graph


# --- path choice and input checks ---------------------------------------------------------------
def test_backend_name_reports_the_path():
    assert attention.backend_name("cpu") == "sdpa"
    assert attention.backend_name(torch.zeros(1)) == "sdpa"
    expected = ("flash-attn" if attention.flash_available() else
                "torch-flash" if attention.torch_flash_available() else "sdpa")
    assert attention.backend_name("cuda") == expected
    assert attention.backend_name("cuda", head_dim=12) == "sdpa"  # flash kernels: multiples of 8
    with pytest.raises(ValueError, match="torch-flash"):
        attention.backend_name("cpu", impl="torch-flash")
    assert attention.backend_name("cuda", impl="sdpa") == "sdpa"
    assert attention.backend_name("cuda", dtype=torch.float32) == "sdpa"  # flash has no fp32
    with pytest.raises(ValueError, match="impl"):
        attention.backend_name("cpu", impl="flash")
    with pytest.raises(ValueError, match="impl"):
        attention.backend_name("cpu", impl="triton")


@pytest.mark.parametrize("bad,match", [
    (dict(q=torch.zeros(2, 2, 4, 8)), "q must be"),
    (dict(q=torch.zeros(2, 1, 3, 8)), "multiple of KV heads"),
    (dict(q=torch.zeros(2, 1, 4, 16)), "head_dim"),
    (dict(q=torch.zeros(2, 1, 4, 8, dtype=torch.float64)), "dtype"),
    (dict(cache_seqlens=[3]), "cache_seqlens has 1 entries"),
    (dict(cache_seqlens=[3, 11]), "cache_seqlens must lie"),
    (dict(cache_seqlens=[0, 3]), "cache_seqlens must lie"),
    (dict(cache_seqlens=torch.tensor([1.0, 2.0])), "cache_seqlens must be"),
    (dict(slots=[0, 3]), "slots must lie"),
    (dict(q=torch.zeros(4, 1, 4, 8), cache_seqlens=[1, 1, 1, 1]), "pass slots"),
    (dict(softmax_scale=-1.0), "softmax_scale"),
])
def test_decode_rejects_bad_input_naming_the_argument(bad, match):
    args = dict(q=torch.zeros(2, 1, 4, 8), k_cache=torch.zeros(3, 10, 2, 8), v_cache=torch.zeros(3, 10, 2, 8),
                cache_seqlens=[3, 4])
    args.update(bad)
    with pytest.raises(ValueError, match=match):
        attention.decode(**args)


def test_prefill_rejects_bad_cu_seqlens():
    q, k = torch.zeros(10, 4, 8), torch.zeros(10, 2, 8)
    for cu in ([0, 4, 9], [1, 10], [0, 6, 4, 10], [0]):
        with pytest.raises(ValueError, match="cu_seqlens"):
            attention.prefill(q, k, k, cu)
    with pytest.raises(ValueError, match="cache_seqlens"):
        attention.prefill_with_cache(q, torch.zeros(2, 20, 2, 8), torch.zeros(2, 20, 2, 8), [0, 4, 10], [4, 5])


def test_store_kv_refuses_tokens_past_the_cache():
    kc = torch.zeros(2, 8, 2, 4)
    k = torch.ones(5, 2, 4)
    with pytest.raises(ValueError, match="do not fit"):
        attention.store_kv(kc, kc.clone(), k, k, [0, 5], [4])
    attention.store_kv(kc, kc.clone(), k, k, [0, 5], [3], slots=[1])
    assert kc[1, 3:8].eq(1).all() and kc[1, :3].eq(0).all() and kc[0].eq(0).all()


# --- the flash-attn call packing, against flash-attn's documented semantics ------------------------
def _flash_with_kvcache_model(q, k_cache, v_cache, cache_seqlens=None, cache_batch_idx=None,
                              softmax_scale=None, causal=False):
    """flash_attn_with_kvcache as its docstring defines it: request b reads row
    cache_batch_idx[b] (default b) up to cache_seqlens[b]; causal is aligned bottom-right; a row
    that sees no key outputs zeros. float64, for checking how pyvattn packs its calls."""
    B, S = q.shape[:2]
    if cache_batch_idx is None:
        assert k_cache.shape[0] == B, "flash-attn wants the cache's batch to match q's"
    out = torch.zeros(q.shape, dtype=torch.float64)
    for b in range(B):
        row = b if cache_batch_idx is None else int(cache_batch_idx[b])
        L = int(cache_seqlens[b])
        for i in range(S):
            last = L - S + i if causal else L - 1
            if last >= 0:
                out[b, i] = reference(q[b, i:i + 1], k_cache[row, :L], v_cache[row, :L], softmax_scale,
                                      last if causal else None)[0]
    return out.to(q.dtype)


def _flash_varlen_model(q, k, v, cu_q, cu_k, max_q, max_k, softmax_scale=None, causal=False):
    assert torch.equal(cu_q, cu_k) and max_q == max_k == int((cu_q[1:] - cu_q[:-1]).max())
    out = torch.zeros(q.shape, dtype=q.dtype)
    bounds = cu_q.tolist()
    for a, b in zip(bounds[:-1], bounds[1:]):
        if b > a:
            out[a:b] = reference(q[a:b], k[a:b], v[a:b], softmax_scale, 0 if causal else None).to(q.dtype)
    return out


@pytest.fixture
def flash_model(monkeypatch):
    monkeypatch.setattr(attention, "flash_attn_with_kvcache", _flash_with_kvcache_model)
    monkeypatch.setattr(attention, "flash_attn_varlen_func", _flash_varlen_model)
    monkeypatch.setattr(attention, "backend_name", lambda *a, **k: "flash-attn")


def test_flash_packing_decode_prefill_and_chunked_prefill(flash_model):
    gen = torch.Generator().manual_seed(21)
    hq, hkv, D = 8, 2, 16
    kc, vc = torch.randn(5, 90, hkv, D, generator=gen), torch.randn(5, 90, hkv, D, generator=gen)
    scale = 1 / math.sqrt(D)
    # decode, with and without slots
    q = torch.randn(3, 1, hq, D, generator=gen)
    for slots in ([4, 0, 2], None):
        out = attention.decode(q, kc, vc, [9, 90, 1], slots=slots)
        for b, n in enumerate([9, 90, 1]):
            s = b if slots is None else slots[b]
            assert_close(out[b], reference(q[b], kc[s, :n], vc[s, :n], scale, None), torch.float32)
    # packed prefill
    cu = [0, 4, 4, 11]
    qp, kp, vp = (torch.randn(11, h, D, generator=gen) for h in (hq, hkv, hkv))
    out = attention.prefill(qp, kp, vp, cu)
    for a, b in zip(cu[:-1], cu[1:]):
        if b > a:
            assert_close(out[a:b], reference(qp[a:b], kp[a:b], vp[a:b], scale, 0), torch.float32)
    # chunked prefill: the left padding must give each real query its own causal limit
    new, total, slots = [3, 0, 7, 1], [3, 40, 60, 90], [1, 2, 3, 0]
    cu = [0, 3, 3, 10, 11]
    qc = torch.randn(11, hq, D, generator=gen)
    for use_slots in (True, False):
        out = attention.prefill_with_cache(qc, kc, vc, cu, total, slots=slots if use_slots else None)
        for b in range(4):
            a, e = cu[b], cu[b + 1]
            if e > a:
                s = slots[b] if use_slots else b
                want = reference(qc[a:e], kc[s, :total[b]], vc[s, :total[b]], scale, total[b] - new[b])
                assert_close(out[a:e], want, torch.float32)

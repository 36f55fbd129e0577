"""VAttentionCache under transformers' generate: the same tokens as transformers' own caches.

Models are real architectures built from small configs with random weights (no download), run in
float64 so that greedy ties cannot hide a difference. What transformers' cache tests check of
every cache (tests/utils/test_cache_utils.py: batched generation, beam search through
reorder_cache, extra left padding, a prefilled cache copied and reused) is checked here, plus
memory that follows the tokens, misuse, and failures injected at every mapping call.
"""

from __future__ import annotations

import copy
import threading

import pytest
import torch
from hfmodels import FAMILIES, GREEDY, model, one_thread, prompts  # noqa: F401 (fixture)
from transformers import DynamicCache

from pyvattn import OutOfPages
from pyvattn.integrations.transformers import VAttentionCache

pytestmark = pytest.mark.usefixtures("one_thread")


def vcache(m, batch: int = 8, seq: int = 2048, **kw) -> VAttentionCache:
    kw.setdefault("page_size", "4KiB")  # 16 tokens per page at 2 KV heads x 16 x float64
    return VAttentionCache(m.config, max_batch_size=batch, max_seq_len=seq, **kw)


def generate(m, ids, mask, cache=None, new: int = 12, **kw) -> torch.Tensor:
    kw = {**GREEDY, **kw}
    if cache is not None:
        kw["cache"] = cache
    return m.generate(ids, attention_mask=mask, max_new_tokens=new, **kw)


# --- the same tokens as transformers' caches -----------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("lengths", [[9], [5, 13, 1, 8]], ids=["batch1", "batch4-leftpad"])
def test_greedy_tokens_equal_dynamic_and_static_cache(family, lengths):
    m = model(family)
    ids, mask = prompts(lengths)
    ref_out = generate(m, ids, mask, new=20, return_dict_in_generate=True, output_logits=True)
    ref = ref_out.sequences
    assert all(torch.isfinite(step).all() for step in ref_out.logits)  # no NaN rows agreeing by accident
    static = generate(m, ids, mask, new=20, cache_implementation="static", disable_compile=True)
    with vcache(m) as cache:
        out = generate(m, ids, mask, cache, new=20)
        assert cache.get_seq_length() == ids.shape[1] + 19  # the last token is never fed back
    assert torch.equal(out, ref)
    assert torch.equal(out, static)


def test_sliding_window_model_keeps_history_and_masks_the_window():
    """Mistral with an 8-token window and 16-token prompts: the window really cuts. (Rows are not
    padded: with left padding and a window transformers' eager path itself yields NaN.)"""
    m = model("mistral-tiny-swa")
    ids, mask = prompts([16, 16, 16])
    ref = generate(m, ids, mask, new=16)
    no_cache = generate(m, ids, mask, new=16, use_cache=False)
    with vcache(m) as cache:
        out = generate(m, ids, mask, cache, new=16)
    assert torch.equal(ref, no_cache)
    assert torch.equal(out, ref)


def test_thirty_two_layers_batch_of_ninety_six():
    """Real sizes: 32 layers, 96 rows of different left padding."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(num_hidden_layers=32, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=300, tie_word_embeddings=False)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    m = LlamaForCausalLM(config).to(torch.float64).eval()
    ids, mask = prompts([1 + i % 11 for i in range(96)], seed=3)
    ids = ids % 300
    ref = generate(m, ids, mask, new=5)
    with vcache(m, batch=128, seq=64) as cache:
        assert torch.equal(generate(m, ids, mask, cache, new=5), ref)
        assert cache.stats()["map_calls"] == 1  # 11 + 4 tokens: one page per row, all layers at once


# --- what transformers' cache tests check ---------------------------------------------------------
def test_beam_search_reorders_rows():
    m = model("llama-tiny")
    ids, mask = prompts([6, 3], seed=1)
    kw = dict(num_beams=3, num_return_sequences=2, return_dict_in_generate=True, output_scores=True)
    ref = generate(m, ids, mask, new=12, **kw)
    with vcache(m) as cache:
        out = generate(m, ids, mask, cache, new=12, **kw)
    # reorder_cache really moved rows: some returned sequence comes from several beams
    assert any(len(set(row.tolist()) - {-1}) > 1 for row in out.beam_indices)
    assert torch.equal(out.sequences, ref.sequences)
    assert torch.equal(out.beam_indices, ref.beam_indices)


def test_num_return_sequences_sampling_expands_rows():
    m = model("qwen2-tiny")
    ids, mask = prompts([4, 7], seed=2)
    kw = dict(do_sample=True, num_return_sequences=3, top_k=5)
    torch.manual_seed(11)
    ref = generate(m, ids, mask, new=8, **kw)
    with vcache(m) as cache:
        torch.manual_seed(11)
        out = generate(m, ids, mask, cache, new=8, **kw)
    assert out.shape[0] == 6
    assert torch.equal(out, ref)


def test_extra_left_padding_does_not_change_the_output():
    m = model("qwen3-tiny")
    ids, mask = prompts([5, 9])
    wide_ids, wide_mask = prompts([5, 9], pad_to=32)
    with vcache(m) as cache:
        out = generate(m, ids, mask, cache)
        cache.reset()
        wide = generate(m, wide_ids, wide_mask, cache)
    assert torch.equal(wide[:, 32:], out[:, 9:])
    assert torch.equal(out, generate(m, ids, mask))


def test_cache_reused_across_generate_calls_multi_turn():
    """Turn 2 passes the whole conversation; generate feeds only the tokens the cache lacks."""
    m = model("llama-tiny")
    ids, mask = prompts([7, 4], seed=5)
    follow_up, _ = prompts([6, 6], seed=6)

    def conversation(cache):
        first = generate(m, ids, mask, cache, new=10)
        turn2 = torch.cat([first, follow_up], dim=1)
        mask2 = torch.cat([mask, torch.ones(2, turn2.shape[1] - mask.shape[1], dtype=torch.long)], dim=1)
        return first, generate(m, turn2, mask2, cache, new=10)

    ref_first, ref_second = conversation(DynamicCache(config=m.config))
    with vcache(m) as cache:
        first, second = conversation(cache)
        assert cache.get_seq_length() == second.shape[1] - 1
    assert torch.equal(first, ref_first)
    assert torch.equal(second, ref_second)


def test_reset_between_calls_and_memory_kept_for_the_next_generation():
    m = model("mistral-tiny")
    big_ids, big_mask = prompts([40, 33, 12, 50], seed=7)
    small_ids, small_mask = prompts([8, 3], seed=8)
    with vcache(m) as cache:
        generate(m, big_ids, big_mask, cache)
        mapped, calls = cache.stats()["mapped_bytes"], cache.stats()["map_calls"]
        cache.reset()
        assert cache.get_seq_length() == 0 and cache.stats()["used_bytes"] == 0
        out = generate(m, small_ids, small_mask, cache)
        assert torch.equal(out, generate(m, small_ids, small_mask))
        # the second generation ran in pages the first one mapped
        assert cache.stats()["map_calls"] == calls and cache.stats()["mapped_bytes"] == mapped
        cache.reset(release_memory=True)
        assert cache.stats()["mapped_bytes"] == 0 and cache.stats()["physical_bytes"] == 0
        assert torch.equal(generate(m, small_ids, small_mask, cache), out)


def test_prefilled_prompt_cache_copied_per_request():
    """transformers' test_cache_copy: prefill a shared prefix once, deepcopy it for each request."""
    m = model("qwen2-tiny")
    prefix, _ = prompts([10], seed=9)
    suffixes = [prompts([n], seed=10 + n)[0] for n in (3, 6)]

    def run(prompt_cache):
        with torch.no_grad():
            m(prefix, cache=prompt_cache)
        outs = []
        for suffix in suffixes:
            full = torch.cat([prefix, suffix], dim=1)
            outs.append(generate(m, full, torch.ones_like(full), copy.deepcopy(prompt_cache), new=8))
        return outs

    ref = run(DynamicCache(config=m.config))
    with vcache(m, dtype=torch.float64) as prompt_cache:
        outs = run(prompt_cache)
        assert prompt_cache.get_seq_length() == 10  # the copies grew, the original did not
    for a, b in zip(outs, ref):
        assert torch.equal(a, b)


# --- memory follows the tokens ---------------------------------------------------------------------
def test_mapped_memory_follows_tokens_not_max_seq_len():
    m = model("llama-tiny")
    ids, mask = prompts([20, 20, 20], seed=12)
    with vcache(m, batch=4, seq=32768) as cache:
        seen = []
        for new in (1, 16, 64, 128):
            cache.reset()
            generate(m, ids, mask, cache, new=new)
            kv = cache.kvcache
            tokens = 20 + new - 1
            pages = -(-tokens * kv.token_bytes // kv.page_size)
            assert cache.stats()["mapped_bytes"] == 3 * pages * kv.page_size * kv.num_regions
            seen.append(cache.stats()["mapped_bytes"])
        assert seen == sorted(seen) and seen[0] < seen[-1]
    # transformers' StaticCache, sized for the same max_seq_len, holds all of it from the start
    static = generate(m, ids, mask, new=1, cache_implementation="static", disable_compile=True,
                      max_cache_len=32768, return_dict_in_generate=True).cache
    static_bytes = sum(t.nbytes for layer in static.layers for t in (layer.keys, layer.values))
    assert static_bytes == 3 * 32768 * kv.token_bytes * kv.num_regions
    assert seen[-1] * 100 < static_bytes


# --- direct updates, as transformers' synthetic cache tests --------------------------------------
def _kv(values, rows: int = 1, heads: int = 2, head_dim: int = 16) -> torch.Tensor:
    t = torch.tensor(values, dtype=torch.float64)[None, None, :, None]
    return t.expand(rows, heads, len(values), head_dim).clone()


def test_update_per_layer_independently_like_dynamic_cache():
    m = model("mistral-tiny")
    dyn, cache = DynamicCache(), vcache(m, dtype=torch.float64)
    for layer, vals in [(0, [1.0, 2.0]), (1, [10.0, 20.0]), (0, [3.0]), (1, [30.0]), (0, [4.0])]:
        k_ref, _ = dyn.update(_kv(vals), _kv(vals) * -1, layer)
        k, v = cache.update(_kv(vals), _kv(vals) * -1, layer)
        assert torch.equal(k, k_ref) and torch.equal(v, -k)
    assert cache.layers[0].keys[0, 0, :, 0].tolist() == [1.0, 2.0, 3.0, 4.0]
    assert cache.layers[1].keys[0, 0, :, 0].tolist() == [10.0, 20.0, 30.0]
    assert cache.get_seq_length(0) == 4 and cache.get_seq_length(1) == 3
    assert cache.get_mask_sizes(1, 0) == (5, 0)
    # the views point into the slabs: no copy was made
    assert cache.layers[0].keys.data_ptr() == cache.kvcache.k[0].data_ptr()
    cache.close()


def test_row_operations_and_crop_match_dynamic_cache():
    m = model("mistral-tiny")
    gen = torch.Generator().manual_seed(0)
    k0 = torch.randn(3, 2, 5, 16, generator=gen, dtype=torch.float64)
    dyn, cache = DynamicCache(), vcache(m, dtype=torch.float64)
    ops = [("update", None), ("reorder_cache", torch.tensor([2, 2, 0])),
           ("batch_repeat_interleave", 2), ("batch_select_indices", torch.tensor([5, 0, 3, 1])),
           ("batch_select_indices", torch.tensor([True, False, True, True])), ("crop", -2)]
    for name, arg in ops:
        for c in (dyn, cache):
            if name == "update":
                for layer in range(2):
                    c.update(k0 + layer, k0 - layer, layer)
            else:
                getattr(c, name)(arg)
        for layer in range(2):
            assert torch.equal(cache.layers[layer].keys, dyn.layers[layer].keys), name
            assert torch.equal(cache.layers[layer].values, dyn.layers[layer].values), name
    assert cache.get_seq_length() == 3
    cache.close()


# --- misuse and failures ---------------------------------------------------------------------------
def test_bad_arguments_name_what_is_wrong():
    m = model("llama-tiny")
    with pytest.raises(ValueError, match="kvcache_options"):
        VAttentionCache(m.config, 2, 64, page_szie="4KiB")
    with pytest.raises(ValueError, match="max_batch_size"):
        VAttentionCache(m.config, 0, 64, dtype=torch.float64)
    config = copy.deepcopy(m.config)
    config.layer_types = ["full_attention", "linear_attention", "full_attention", "full_attention"]
    with pytest.raises(ValueError, match="linear_attention"):
        VAttentionCache(config, 2, 64)
    with vcache(m, batch=2, seq=16, dtype=torch.float64) as cache:
        with pytest.raises(ValueError, match="max_batch_size=2"):
            cache.update(_kv([1.0], rows=3), _kv([1.0], rows=3), 0)
        cache.update(_kv(list(range(10))), _kv(list(range(10))), 0)
        with pytest.raises(ValueError, match="max_seq_len=16"):
            cache.update(_kv([0.0] * 7), _kv([0.0] * 7), 0)
        with pytest.raises(ValueError, match="float64"):
            cache.update(_kv([1.0]).float(), _kv([1.0]).float(), 0)
        with pytest.raises(ValueError, match="KV heads"):
            cache.update(_kv([1.0], heads=4), _kv([1.0], heads=4), 0)
        with pytest.raises(ValueError, match="reset"):
            cache.update(_kv([1.0], rows=2), _kv([1.0], rows=2), 0)
        with pytest.raises(ValueError, match="negative"):
            cache.crop(3)
        # none of the refused updates changed the layer
        assert cache.get_seq_length() == 10 and cache.layers[0].keys[0, 0, :, 0].tolist() == list(range(10))


def test_out_of_pages_leaves_the_cache_usable():
    m = model("llama-tiny")
    ids, mask = prompts([30, 30, 30, 30], seed=4)
    small_ids, small_mask = prompts([5], seed=4)
    # 4 layers x K,V x 4 KiB pages: room for 2 pages per region
    with vcache(m, batch=4, memory_budget=8 * 2 * 4096 * 2) as cache:
        with pytest.raises(OutOfPages):
            generate(m, ids, mask, cache, new=40)
        lengths = {layer.get_seq_length() for layer in cache.layers}
        assert len(lengths) == 1  # every layer stopped at the same token: none was half-written
        cache.reset()
        assert torch.equal(generate(m, small_ids, small_mask, cache), generate(m, small_ids, small_mask))


@pytest.mark.parametrize("exc", [KeyboardInterrupt, RuntimeError])
def test_interrupted_at_every_mapping_call_then_reset_generates_right(exc, monkeypatch):
    """An exception (Ctrl-C included) at the n-th KVCache.step of a generation, for every n: the
    layers' lengths equal what was written, and after reset() the cache generates correctly."""
    m = model("qwen3-tiny")
    ids, mask = prompts([9, 2, 14], seed=13)
    ref = generate(m, ids, mask, new=40)
    with vcache(m) as cache:
        generate(m, ids, mask, cache, new=40)
        total = cache.stats()["map_calls"]
        cache.reset(release_memory=True)
        kv = cache.kvcache
        real_step = kv.step
        for fail_at in range(total):
            calls = []

            def step(seq_lens, fail_at=fail_at, calls=calls):
                calls.append(1)
                if len(calls) > fail_at:
                    raise exc("injected")
                return real_step(seq_lens)

            monkeypatch.setattr(kv, "step", step)
            with pytest.raises(exc):
                generate(m, ids, mask, cache, new=40)
            monkeypatch.setattr(kv, "step", real_step)
            for layer in cache.layers:
                assert layer.get_seq_length() <= kv.mapped_tokens(0)
            cache.reset(release_memory=bool(fail_at % 2))
            assert torch.equal(generate(m, ids, mask, cache, new=40), ref)
            cache.reset()


def test_two_threads_each_with_its_own_cache():
    m = model("llama-tiny")
    jobs = [prompts([7, 3], seed=20), prompts([12], seed=21)]
    refs = [generate(m, i, k, new=16) for i, k in jobs]
    results: dict[int, torch.Tensor] = {}

    def work(n):
        with vcache(m) as cache:
            for _ in range(3):
                cache.reset()
                results[n] = generate(m, *jobs[n], cache, new=16)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(torch.equal(results[n], refs[n]) for n in range(2))

"""Automatic prefix reuse (issue 14, item 3): ``alloc_slot(tokens=prompt)`` finds the longest
prefix another slot holds in whole pages by a hash chain over page-sized token blocks, takes a
finished request's slot over in place (nothing mapped) or forks a running one; retained prefixes
go least recently used first when the pool runs dry."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from books import check_cache
from pyvattn import KVCache, attention
from pyvattn.core.prefix import block_hashes
from test_attention import assert_close, reference
from test_fork import Written

TPP = 16  # 2 heads x 32 x fp32 = 256 B per token: 16 tokens per 4 KiB page


def _cache(slots: int = 4, layers: int = 2, budget=None) -> KVCache:
    return KVCache(layers, 2, 32, slots, 128, torch.float32, device="cpu", page_size=4096, backend="host",
                   memory_budget=budget)


def _prompt(family: int, n: int) -> np.ndarray:
    return np.arange(n, dtype=np.int64) * 3 + 1000 * family


def _serve(cache, data, tokens, finish: bool = True) -> int:
    """A request: claimed with its prompt, prefilled from ``cached_tokens`` on, maybe finished."""
    slot = cache.alloc_slot(tokens=tokens)
    cached = cache.cached_tokens(slot)
    cache.step({slot: len(tokens)})
    if cached:  # taken over in place (what these tests set up): the slot's own tokens
        data.kv[slot] = [(k[:cached], v[:cached]) for k, v in data.kv[slot]]
        data.check(slot)
    else:
        data.kv.pop(slot, None)
    data.write(slot, cached, len(tokens))
    if finish:
        cache.free_slot(slot)
    return slot


def test_the_hash_chain_says_equal_blocks_only_with_equal_prefixes():
    a, b = _prompt(0, 64), _prompt(0, 64)
    b[20] += 1  # block 1 differs: blocks 1.. differ, block 0 is equal
    ha, hb = block_hashes(a, TPP), block_hashes(b, TPP)
    assert len(ha) == 4 and ha[0] == hb[0] and all(x != y for x, y in zip(ha[1:], hb[1:]))
    assert block_hashes(a[:47], TPP) == ha[:2]  # only full blocks


def test_a_finished_requests_prefix_is_taken_over_in_place_with_no_mapping():
    with _cache() as cache:
        data = Written(cache)
        a = _serve(cache, data, _prompt(0, 100))
        before = cache.stats()
        b = cache.alloc_slot(tokens=_prompt(0, 120))
        assert b == a and cache.cached_tokens(b) == 96 and cache.seq_len(b) == 96  # 6 whole pages
        after = cache.stats()
        assert after["map_calls"] == before["map_calls"] and after["shared_pages"] == 0
        assert after["prefix_hits"] == 1 and after["prefix_tokens_saved"] == 96
        data.kv[b] = [(k[:96], v[:96]) for k, v in data.kv[a]]
        data.check(b)
        # prefill starts at the cached tokens, attending to them: chunked prefill equals the reference
        cache.step({b: 120})
        data.write(b, 96, 120)
        for layer in range(cache.num_layers):
            q = torch.randn(24, 4, 32, generator=torch.Generator().manual_seed(layer))
            got = attention.prefill_with_cache(q, cache.k[layer], cache.v[layer], [0, 24], [120], slots=[b])
            k, v = data.kv[b][layer]
            assert_close(got, reference(q, k, v, 32 ** -0.5, 96), torch.float32)
        check_cache(cache)


def test_a_running_requests_prefix_is_shared_and_the_last_token_is_left_to_compute():
    with _cache() as cache:
        data = Written(cache)
        a = _serve(cache, data, _prompt(0, 100), finish=False)
        b = cache.alloc_slot(tokens=_prompt(0, 64))  # 4 blocks match; the last token is recomputed
        assert b != a and cache.cached_tokens(b) == 48 and cache.stats()["shared_pages"] == 3 * cache.num_regions
        data.fork(b, a, 48)
        data.check(b)
        cache.step({b: 64})
        data.write(b, 48, 64)
        data.check(a), data.check(b)
        check_cache(cache)


@pytest.mark.parametrize("change, cached", [(20, 16), (0, 0), (None, 80)])
def test_the_longest_equal_prefix_is_reused_and_no_more(change, cached):
    with _cache() as cache:
        data = Written(cache)
        _serve(cache, data, _prompt(0, 100))
        other = _prompt(0, 110)
        if change is not None:
            other[change] = -5
        slot = cache.alloc_slot(tokens=other[:90])
        assert cache.cached_tokens(slot) == cached
        assert cache.stats()["prefix_queries"] == 2 and cache.stats()["prefix_hits"] == (cached > 0)


def test_a_reclaimed_prefix_is_no_longer_found():
    with _cache() as cache:
        data = Written(cache)
        _serve(cache, data, _prompt(0, 100))
        cache.trim()  # the finished request's pages go back
        slot = cache.alloc_slot(tokens=_prompt(0, 100))
        assert cache.cached_tokens(slot) == 0


def test_retained_prefixes_go_least_recently_used_first():
    """Three finished requests' prefixes fill the budget; A is used again. A new request takes the
    slot that holds no prefix and, growing, reclaims the least recently used prefix (B's); the
    next one, finding every free slot holding a prefix, takes the least recently used (C's)."""
    with _cache(layers=1, budget=24 * 4096) as cache:  # 2 regions, 12 pages each
        data = Written(cache)
        a, b, c = (_serve(cache, data, _prompt(f, 64)) for f in range(3))
        assert cache.pool.headroom == 0 and len({a, b, c}) == 3, "a new prompt must not evict a prefix"
        assert _serve(cache, data, _prompt(0, 64)) == a and cache.stats()["prefix_hits"] == 1
        d = cache.alloc_slot(seq_len=64)
        assert d not in (a, b, c)
        cache.step({d: 64})  # 4 more pages per region: reclaimed from B's slot, not A's or C's
        assert cache.cached_tokens(e := cache.alloc_slot(tokens=_prompt(5, 64))) == 0 and e == b
        assert cache.cached_tokens(cache.alloc_slot(tokens=_prompt(2, 64))) == 48
        assert cache.cached_tokens(cache.alloc_slot(tokens=_prompt(0, 64))) == 48
        check_cache(cache)


def test_bad_tokens_are_refused_naming_the_argument():
    with _cache() as cache:
        for bad in ([[1, 2], [3, 4]], [1.5, 2.0], ["a"], np.arange(129)):
            with pytest.raises(ValueError, match="tokens"):
                cache.alloc_slot(tokens=bad)
        assert not cache._slots.active.any()
        slot = cache.alloc_slot(tokens=torch.arange(40))  # a tensor does
        assert cache.cached_tokens(slot) == 0
        assert cache.cached_tokens(slot + 1) == 0  # a free slot


def test_pages_that_split_a_token_reuse_nothing_and_still_serve():
    # 3 heads x 32 x fp32 = 384 B per token: a 4 KiB page does not hold whole tokens
    with KVCache(1, 3, 32, 2, 64, torch.float32, device="cpu", page_size=4096, backend="host") as cache:
        a = cache.alloc_slot(tokens=_prompt(0, 60))
        cache.step({a: 60})
        cache.free_slot(a)
        b = cache.alloc_slot(tokens=_prompt(0, 60))
        assert cache.cached_tokens(b) == 0
        c = cache.fork(b, 0)
        assert cache.seq_len(c) == 0

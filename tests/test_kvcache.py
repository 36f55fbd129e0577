"""KVCache behaviour on a real backend: data integrity across growth, reuse, reclaim and errors."""

from __future__ import annotations

import random
import threading

import pytest
import torch

from kvdata import check, write
from pyvattn import OutOfPages, OutOfSlots


def test_tensors_have_flash_attn_layout(make_cache):
    cache = make_cache()
    assert len(cache.k) == len(cache.v) == cache.num_layers
    D = cache.head_dim
    for t in (*cache.k, *cache.v):  # compare tuples: printing a tensor would read unmapped pages
        assert tuple(t.shape) == (6, 1000, 2, D) and t.dtype == torch.float32
        assert t.stride()[1:] == (2 * D, D, 1)  # tokens, heads, dim contiguous within a slot
    # every layer's K and V are disjoint memory
    starts = sorted(t.data_ptr() for t in (*cache.k, *cache.v))
    span = cache.slot_bytes * cache.max_batch_size
    assert all(b - a >= span for a, b in zip(starts, starts[1:]))


def test_random_growth_across_page_boundaries_keeps_every_value(make_cache):
    cache = make_cache()
    rng = random.Random(1234)
    lens = {}
    for _ in range(4):
        lens[cache.alloc_slot()] = 0
    tags = {slot: 100 + slot for slot in lens}
    for _ in range(60):
        slot = rng.choice(list(lens))
        new = min(cache.max_seq_len, lens[slot] + rng.choice([1, 3, 31, 32, 33, 77]))
        cache.step({slot: new})
        write(cache, slot, tags[slot], lens[slot], new)
        lens[slot] = new
    for slot, n in lens.items():
        check(cache, slot, tags[slot], n)
        assert cache.seq_len(slot) == n
        assert cache.mapped_tokens(slot) >= n
    s = cache.stats()
    assert s["used_bytes"] == sum(lens.values()) * s["bytes_per_token"]
    assert s["mapped_bytes"] >= s["used_bytes"] and s["waste_bytes"] == s["mapped_bytes"] - s["used_bytes"]


def test_whole_batch_step_is_one_map_call(make_cache):
    cache = make_cache()
    slots = [cache.alloc_slot() for _ in range(4)]
    cache.step({s: 100 + 50 * i for i, s in enumerate(slots)})
    assert cache.stats()["map_calls"] == 1
    cache.step({s: 100 + 50 * i for i, s in enumerate(slots)})  # nothing new to map
    assert cache.stats()["map_calls"] == 1


def test_seq_lens_as_tensor_indexed_by_slot(make_cache):
    cache = make_cache()
    a, b = cache.alloc_slot(), cache.alloc_slot()
    lens = torch.zeros(cache.max_batch_size, dtype=torch.int32)
    lens[a], lens[b] = 70, 5
    cache.step(lens)
    write(cache, a, 1, 0, 70)
    write(cache, b, 2, 0, 5)
    check(cache, a, 1, 70)
    check(cache, b, 2, 5)


def test_free_keeps_pages_mapped_and_best_fit_reuses_them(make_cache):
    cache = make_cache()
    big, small, other = cache.alloc_slot(), cache.alloc_slot(), cache.alloc_slot()
    cache.step({big: 600, small: 100, other: 50})
    write(cache, other, 9, 0, 50)
    mapped = cache.stats()["mapped_bytes"]
    cache.free_slot(big)
    cache.free_slot(small)
    assert cache.stats()["mapped_bytes"] == mapped  # deferred reclaim: nothing unmapped yet
    assert cache.alloc_slot(seq_len=90) == small  # smallest free slot that already covers 90 tokens
    assert cache.alloc_slot() == big  # no hint: the free slot with the most pages mapped
    cache.step({small: 90, big: 600})
    assert cache.stats()["map_calls"] == 1  # reuse needed no new mapping
    write(cache, small, 3, 0, 90)
    check(cache, other, 9, 50)
    check(cache, small, 3, 90)


def test_no_deferred_reclaim_unmaps_at_free(make_cache):
    cache = make_cache(deferred_reclaim=False)
    a, b = cache.alloc_slot(), cache.alloc_slot()
    cache.step({a: 300, b: 40})
    write(cache, b, 5, 0, 40)
    before = cache.stats()
    cache.free_slot(a)
    after = cache.stats()
    assert after["mapped_bytes"] < before["mapped_bytes"]
    assert after["pool_pages_free"] > before["pool_pages_free"]
    check(cache, b, 5, 40)


def test_reclaim_when_pool_runs_dry_keeps_active_data(make_cache):
    probe = make_cache()
    pages_per_req = -(-400 * probe.token_bytes // probe.page_size) * probe.num_regions
    page_size = probe.page_size
    probe.close()
    cache = make_cache(memory_budget=3 * pages_per_req * page_size)  # room for three 400-token requests
    a, b, c = (cache.alloc_slot() for _ in range(3))
    cache.step({a: 400, b: 400, c: 400})
    for tag, s in enumerate((a, b, c)):
        write(cache, s, tag, 0, 400)
    cache.free_slot(a)
    # take every slot, then give `a` back, so the next step must grow a slot with no pages
    others = [cache.alloc_slot() for _ in range(cache.max_batch_size - 2)]
    assert a in others
    cache.free_slot(a)
    d = next(s for s in others if s != a)
    cache.step({d: 400})  # pool is dry and the budget is spent: a's pages are reclaimed
    s = cache.stats()
    assert s["reclaimed_pages_total"] == pages_per_req
    assert s["pool_pages_total"] == 3 * pages_per_req  # the budget was never exceeded
    assert cache.mapped_tokens(a) == 0
    write(cache, d, 3, 0, 400)
    check(cache, b, 1, 400)
    check(cache, c, 2, 400)
    check(cache, d, 3, 400)


def test_out_of_pages_changes_nothing_and_cache_stays_usable(make_cache):
    cache = make_cache()
    per_req = -(-200 * cache.token_bytes // cache.page_size) * cache.num_regions
    cache.close()
    cache = make_cache(memory_budget=2 * per_req * cache.page_size)
    a, b, c = cache.alloc_slot(), cache.alloc_slot(), cache.alloc_slot()
    cache.step({a: 200, b: 100})
    write(cache, a, 1, 0, 200)
    write(cache, b, 2, 0, 100)
    before = cache.stats()
    with pytest.raises(OutOfPages) as err:
        cache.step({a: 200, b: 150, c: 300})  # b's growth would fit, c's does not: all or nothing
    assert err.value.needed > err.value.available
    after = cache.stats()
    for key in ("mapped_bytes", "pool_pages_free", "pool_pages_total", "map_calls", "used_bytes"):
        assert after[key] == before[key], key
    assert cache.seq_len(b) == 100 and cache.mapped_tokens(c) == 0
    check(cache, a, 1, 200)
    check(cache, b, 2, 100)
    cache.step({b: 200})  # what fits still works
    write(cache, b, 2, 100, 200)
    check(cache, b, 2, 200)


def test_reserve_precreates_pages(make_cache):
    P = make_cache().page_size
    cache = make_cache(memory_budget=16 * P)
    created = cache.reserve(8 * P)
    assert created == 8
    s = cache.stats()
    assert s["pool_pages_total"] == s["pool_pages_free"] == created
    slot = cache.alloc_slot()
    cache.step({slot: 32})  # one page in each of the 6 regions
    assert cache.stats()["page_create_calls"] == 1  # the step took pages from the reserve
    with pytest.raises(OutOfPages):
        cache.reserve(17 * P)


def test_step_async_maps_in_background_while_other_slots_are_used(make_cache):
    cache = make_cache()
    a, b = cache.alloc_slot(), cache.alloc_slot()
    cache.step({a: 32, b: 32})
    write(cache, a, 1, 0, 32)
    for n in range(64, 1000, 96):
        cache.step_async({a: 32, b: n})
        # main thread keeps reading and writing slot a while b's pages are being mapped
        write(cache, a, 1, 0, 32)
        check(cache, a, 1, 32)
        cache.step({a: 32, b: n})  # joins; nothing left to map
        write(cache, b, 2, 0, n)
    check(cache, b, 2, 904)
    assert cache.stats()["map_calls"] >= 10


def test_step_async_error_is_raised_on_next_call(make_cache):
    cache = make_cache()
    cache.close()
    cache = make_cache(memory_budget=cache.num_regions * cache.page_size)  # one page per region
    a = cache.alloc_slot()
    cache.step_async({a: 1000})  # input is valid; the mapping itself runs out of pages
    with pytest.raises(OutOfPages):
        cache.stats()
    cache.step({a: 10})  # the cache is still usable
    write(cache, a, 4, 0, 10)
    check(cache, a, 4, 10)


def test_concurrent_step_async_and_tensor_traffic_from_another_thread(make_cache):
    cache = make_cache(max_batch_size=4)
    a, b = cache.alloc_slot(), cache.alloc_slot()
    cache.step({a: 200, b: 1})
    write(cache, a, 7, 0, 200)
    stop = threading.Event()
    errors = []

    def reader():
        try:
            while not stop.is_set():
                check(cache, a, 7, 200)
        except AssertionError as exc:  # pragma: no cover - failure path
            errors.append(exc)

    t = threading.Thread(target=reader)
    t.start()
    try:
        for n in range(33, 1000, 33):
            cache.step_async({a: 200, b: n})
            cache.step({a: 200, b: n})
            write(cache, b, 8, n - 33, n)
    finally:
        stop.set()
        t.join()
    assert not errors
    check(cache, b, 8, 990)


def test_out_of_slots(make_cache):
    cache = make_cache(max_batch_size=2)
    cache.alloc_slot(), cache.alloc_slot()
    with pytest.raises(OutOfSlots):
        cache.alloc_slot()


def test_stats_account_for_k_and_v_of_every_layer(make_cache):
    cache = make_cache()
    slot = cache.alloc_slot()
    cache.step({slot: 33})
    s = cache.stats()
    pages = -(-33 * cache.token_bytes // cache.page_size)
    assert s["mapped_bytes"] == pages * cache.page_size * 2 * cache.num_layers
    assert s["used_bytes"] == 33 * cache.token_bytes * 2 * cache.num_layers
    assert s["active_slots"] == 1 and s["reserved_bytes"] >= cache.slot_bytes * 6 * 2 * 3


def test_close_is_idempotent_and_final(make_cache):
    cache = make_cache()
    slot = cache.alloc_slot()
    cache.step({slot: 10})
    cache.close()
    cache.close()
    with pytest.raises(RuntimeError, match="closed"):
        cache.step({slot: 10})
    assert cache.k == [] and cache.v == []


def test_context_manager_closes(backend_device):
    from pyvattn import KVCache

    name, device = backend_device
    with KVCache(2, 1, 8, 2, 64, torch.float32, device=device, backend=name) as cache:
        slot = cache.alloc_slot()
        cache.step({slot: 64})
        cache.k[1][slot] = 3.0
        assert float(cache.k[1][slot].sum()) == 3.0 * 64 * 8
    with pytest.raises(RuntimeError):
        cache.stats()


def test_reused_slot_excess_is_reclaimed_but_written_tokens_never_are(make_cache):
    probe = make_cache()
    P, tb, regions = probe.page_size, probe.token_bytes, probe.num_regions
    tpp = P // tb  # 32 tokens per page
    probe.close()
    cache = make_cache(memory_budget=12 * regions * P, max_batch_size=2)
    big = cache.alloc_slot()
    cache.step({big: 10 * tpp})  # 10 pages per region
    cache.free_slot(big)
    small = cache.alloc_slot(seq_len=2 * tpp)  # best fit: reuses the 10-page slot
    assert small == big
    cache.step({small: 2 * tpp})
    write(cache, small, 1, 0, 2 * tpp)
    cache.step({small: tpp})  # a smaller length does not shrink what the slot keeps
    assert cache.seq_len(small) == 2 * tpp
    other = cache.alloc_slot()
    cache.step({other: 8 * tpp})  # needs 8 pages: 2 from the budget, 6 of small's 8 excess
    s = cache.stats()
    assert s["reclaimed_pages_total"] == 6 * regions
    assert cache.slot_mapped_bytes(small) == 4 * P * regions  # 2 of the 8 excess pages stay...
    assert cache.mapped_tokens(small) == 2 * tpp  # ... but only what it stepped to is promised
    write(cache, other, 2, 0, 8 * tpp)
    check(cache, small, 1, 2 * tpp)
    check(cache, other, 2, 8 * tpp)
    with pytest.raises(OutOfPages):
        cache.step({other: 11 * tpp})  # would need small's written pages: refused, nothing changes
    check(cache, small, 1, 2 * tpp)
    cache.free_slot(other)
    cache.step({small: 6 * tpp})  # beyond what small kept: must map again, not trust old capacity
    assert cache.mapped_tokens(small) == 6 * tpp
    write(cache, small, 1, 2 * tpp, 6 * tpp)
    check(cache, small, 1, 6 * tpp)


def test_step_async_with_nothing_to_map_records_lengths_without_a_thread(make_cache):
    cache = make_cache()
    s = cache.alloc_slot()
    cache.step({s: 65})  # 3 pages of 32 tokens: room up to 96
    threads = threading.active_count()
    for n in range(66, 97):
        cache.step_async({s: n})
    assert threading.active_count() == threads and cache.seq_len(s) == 96
    cache.step_async({s: 300})  # needs pages: mapped in the background
    cache.step({s: 300})
    write(cache, s, 1, 0, 300)
    check(cache, s, 1, 300)


def _device_of(cache, pages: int) -> None:
    """Make the host backend's page creation refuse beyond ``pages`` pages, as a full GPU does."""
    create = cache.backend.create_pages

    def create_on_a_small_device(count, at=None):
        if cache.pool.total_pages + count > pages:
            raise OutOfPages("device full", needed=count)
        return create(count, at)

    cache.backend.create_pages = create_on_a_small_device


def test_device_exhaustion_under_the_budget_reclaims_finished_slots(backend_device):
    """The budget allows more pages than the device can create: step() must then reclaim a
    finished slot's pages rather than fail (and must not lose the active slot's data)."""
    from pyvattn import KVCache
    name, device = backend_device
    if name != "host":
        pytest.skip("the device limit is imposed on the host backend's page creation")
    P = 4096
    cache = KVCache(1, 1, 64, 4, 1024, torch.float32, device="cpu", page_size=P, backend="host",
                    memory_budget=10 * P)
    _device_of(cache, pages=8)
    try:
        a, b = cache.alloc_slot(), cache.alloc_slot()
        cache.step({a: 64, b: 0})  # 4 pages of 16 tokens in each of K and V: the device is full
        write(cache, a, 1, 0, 64)
        cache.free_slot(a)
        cache.step({b: 48})  # 6 pages: only a's reclaimed pages can supply them
        write(cache, b, 2, 0, 48)
        check(cache, b, 2, 48)
        assert cache.stats()["reclaimed_pages_total"] >= 6
    finally:
        cache.close()


def test_cache_dropped_during_step_async_returns_its_memory():
    """Dropped without close() while the mapper thread runs, the cache is finalised on that
    thread; its memory must still go back (no self-join, no leak)."""
    import gc
    import time

    from books import kv_memfds
    from pyvattn import KVCache

    before = kv_memfds()
    cache = KVCache(8, 8, 128, 8, 1024, torch.float16, device="cpu", page_size="64KiB", backend="host")
    assert kv_memfds() == before + 1
    slots = [cache.alloc_slot() for _ in range(8)]
    cache.step_async({s: 1024 for s in slots})
    del cache, slots
    for _ in range(100):
        gc.collect()
        if kv_memfds() == before:
            break
        time.sleep(0.05)
    assert kv_memfds() == before


# --- the review's cases (issue 11), each as it was reproduced ------------------------------------
def test_what_is_safe_is_what_mapped_tokens_says(make_cache):
    """write_below_mapped_tokens: mapped_tokens() reported the slot's mapped capacity, reclaim kept
    only its stepped length, and data written between the two vanished. mapped_tokens() is now the
    promise itself: the stepped length rounded up to whole pages."""
    probe = make_cache()
    P, tpp, regions = probe.page_size, probe.page_size // probe.token_bytes, probe.num_regions
    probe.close()
    cache = make_cache(max_batch_size=2, memory_budget=16 * regions * P)
    a = cache.alloc_slot()
    cache.step({a: 16 * tpp})
    cache.free_slot(a)
    a = cache.alloc_slot(seq_len=tpp // 2)  # best fit: 16 pages still mapped
    cache.step({a: tpp // 2})
    assert cache.seq_len(a) == tpp // 2 and cache.mapped_tokens(a) == tpp
    assert cache.slot_mapped_bytes(a) == 16 * regions * P  # mapped, but not promised
    write(cache, a, 1, 0, tpp)  # up to mapped_tokens: safe
    b = cache.alloc_slot()
    cache.step({b: 14 * tpp})  # reclaims a's pages beyond its first
    write(cache, b, 2, 0, 14 * tpp)
    check(cache, a, 1, tpp)
    check(cache, b, 2, 14 * tpp)
    assert cache.mapped_tokens(a) == tpp and cache.slot_mapped_bytes(a) == 2 * regions * P


def test_a_step_the_device_refuses_reclaims_nothing():
    """r4_reclaim_then_fail: the budget allowed more pages than the device could create; the step
    counted budget headroom as available, reclaimed a finished request's pages, then raised
    OutOfPages anyway. Now the device is asked before anything is reclaimed."""
    from pyvattn import KVCache
    P = 4096
    cache = KVCache(1, 1, 64, 4, 1024, torch.float32, device="cpu", page_size=P, backend="host",
                    memory_budget=24 * P)
    _device_of(cache, pages=16)
    try:
        a, b = cache.alloc_slot(), cache.alloc_slot()
        cache.step({a: 64, b: 64})  # 4 pages x 2 regions each: the device is full
        write(cache, b, 2, 0, 64)
        cache.free_slot(a)  # a's 8 pages stay mapped for reuse
        with pytest.raises(OutOfPages):
            cache.step({b: 64 + 16 * 7})  # 14 more pages: 8 reclaimable, the device gives no more
        s = cache.stats()
        assert s["reclaimed_pages_total"] == 0 and cache.slot_mapped_bytes(a) == 8 * P
        check(cache, b, 2, 64)
        cache.step({b: 64 + 16 * 4})  # 8 more: exactly a's pages
        write(cache, b, 2, 64, 128)
        check(cache, b, 2, 128)
    finally:
        cache.close()


def test_an_unmap_that_fails_half_way_leaks_nothing():
    """partial_unmap_error: a backend unmap that failed half-way (reporting what it did unmap) left
    the slot's books as before; pages leaked and the next request segfaulted."""
    from books import check_cache
    from pyvattn import KVCache
    from pyvattn.errors import OSCallError
    cache = KVCache(1, 1, 64, 2, 512, torch.float32, device="cpu", page_size=4096, backend="host")
    try:
        a = cache.alloc_slot()
        cache.step({a: 512})
        cache.free_slot(a)  # 32 pages per region stay mapped
        real = cache.backend._unmap

        def fail_half(batch, done):
            real(type(batch)(batch.vas, batch.handles, batch.starts[:1], batch.lengths[:1]), done)
            raise OSCallError("mmap", "ENOMEM", 12, "injected")

        cache.backend._unmap = fail_half
        with pytest.raises(OSCallError):
            cache.trim()
        del cache.backend._unmap
        check_cache(cache)
        assert cache.stats()["mapped_bytes"] == 32 * 4096  # one region's run went, one stayed
        s = cache.alloc_slot(seq_len=512)
        cache.step({s: 512})  # maps what is missing again
        write(cache, s, 3, 0, 512)
        check(cache, s, 3, 512)
        check_cache(cache)
        cache.free_slot(s)
        cache.trim()
        check_cache(cache)
        assert cache.backend.allocated_bytes() == 0
    finally:
        cache.close()


@pytest.mark.parametrize("during", ["trim", "step"])
def test_ctrl_c_inside_a_driver_loop_leaves_the_books_equal_to_reality(monkeypatch, during):
    """r2_kbint_unmap_segv (Ctrl-C after trim() unmapped one run: pages the table counted as mapped
    were not; the next request segfaulted) and r3_kbint_map_ghost (Ctrl-C after three mmaps of a
    step: pages stayed mapped at VAs the table called free, then were mapped under another slot)."""
    from books import check_cache
    from pyvattn import KVCache
    from pyvattn._ffi import libc
    cache = KVCache(2, 1, 64, 4, 512, torch.float32, device="cpu", page_size=4096, backend="host")
    try:
        a = cache.alloc_slot()
        cache.step({a: 100})
        if during == "trim":
            cache.free_slot(a)
        calls, fn = [0], ("mmap" if during == "trim" else "raw_mmap")
        real = getattr(libc, fn)

        def ctrl_c_on_the_second(*args):
            calls[0] += 1
            if calls[0] == 2:
                raise KeyboardInterrupt
            return real(*args)

        monkeypatch.setattr(libc, fn, ctrl_c_on_the_second)
        with pytest.raises(KeyboardInterrupt):
            cache.trim() if during == "trim" else cache.step({a: 300, cache.alloc_slot(): 200})
        monkeypatch.setattr(libc, fn, real)
        check_cache(cache)
        s = cache.alloc_slot(seq_len=100)
        cache.step({s: 300})
        write(cache, s, 4, 0, 300)
        check(cache, s, 4, 300)
        check_cache(cache)
    finally:
        cache.close()


def test_the_contract_is_stated_the_same_way_in_the_docstring_the_readme_and_mapped_tokens():
    import re
    from pathlib import Path

    from pyvattn import KVCache

    sentence = ("Tokens [0, mapped_tokens(slot)) of an allocated slot, its stepped length rounded up to "
                "whole pages, are safe to write and read until free_slot(slot); pages the slot holds "
                "beyond them may be reclaimed by any step.")

    def plain(text: str) -> str:
        return re.sub(r"\s+", " ", text.replace("`", ""))

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    for where, text in (("README.md", readme), ("KVCache", KVCache.__doc__),
                        ("KVCache.mapped_tokens", KVCache.mapped_tokens.__doc__)):
        assert sentence in plain(text), where

"""sleep() and wake() (issue 15, item 1): sleep releases every physical page (the host memfd's
blocks drop to zero) while k/v keep their addresses; sleep(keep=True) keeps the running requests'
KV in host memory and wake restores it byte for byte, so decoding resumes and attention still
equals a float64 reference; a sleeping cache refuses use with CacheAsleep; a failure at any call
of sleep or wake leaves the books equal to reality, and trying again finishes the job."""

from __future__ import annotations

import pytest
import torch

from books import check_cache
from cachemodel import small_cache
from faults import BACKEND_CALLS, HOST_DRIVER_CALLS, POOL_CALLS, Injector
from kvdata import check, write
from pyvattn import CacheAsleep, KVCache, MemoryBudget, OutOfPages, attention
from pyvattn._ffi import libc
from test_attention import reference

P = 4096  # small_cache: 16 tokens per page, 4 regions, 4 slots of 128 tokens


def _pointers(cache) -> list[int]:
    return [t.data_ptr() for t in cache.k + cache.v]


def _busy(cache):
    """a: 70 tokens running (the rest of its last page written too: mapped_tokens is the contract);
    b: 40 tokens finished (retained); pooled pages reserved on top."""
    a, b = cache.alloc_slot(), cache.alloc_slot()
    cache.step({a: 70, b: 40})
    write(cache, a, 1, 0, cache.mapped_tokens(a))
    write(cache, b, 2, 0, 40)
    cache.free_slot(b)
    cache.reserve(40 * P)
    return a


def test_sleep_releases_every_page_and_addresses_stay():
    with small_cache(budget_pages=40) as cache:
        s = cache.alloc_slot()
        cache.step({s: 100})
        write(cache, s, 1, 0, 100)
        cache.free_slot(s)
        cache.reserve(40 * P)
        ptrs = _pointers(cache)
        cache.sleep()
        assert cache.asleep and cache.stats()["asleep"]
        assert cache.backend.allocated_bytes() == 0  # punched: the OS has the memory back
        assert cache.backend.books()["live"] == set() and cache.stats()["physical_bytes"] == 0
        check_cache(cache)
        cache.wake()
        assert not cache.asleep and _pointers(cache) == ptrs
        s = cache.alloc_slot()
        cache.step({s: 128})
        write(cache, s, 3, 0, 128)
        check(cache, s, 3, 128)
        check_cache(cache)


def test_sleep_keep_restores_running_requests_byte_exact_and_decoding_resumes():
    torch.manual_seed(0)
    with KVCache(2, 2, 16, 4, 64, torch.float32, device="cpu", page_size=P, backend="host") as cache:
        lens = {cache.alloc_slot(): n for n in (37, 5)}
        cache.step(lens)
        for s, n in lens.items():
            for t in cache.k + cache.v:
                t[s, :n] = torch.randn(n, 2, 16)
        kept = {s: [t[s, :n].clone() for t in cache.k + cache.v] for s, n in lens.items()}
        ptrs = _pointers(cache)
        cache.sleep(keep=True)
        assert cache.backend.allocated_bytes() == 0
        cache.wake()
        assert _pointers(cache) == ptrs and cache.backend.allocated_bytes() > 0
        for s, n in lens.items():
            for got, want in zip((t[s, :n] for t in cache.k + cache.v), kept[s]):
                assert torch.equal(got.view(torch.int32), want.view(torch.int32))  # bit for bit
        for _ in range(3):  # decode on: one more token each, attention over the restored cache
            lens = {s: n + 1 for s, n in lens.items()}
            cache.step(lens)
            slots = list(lens)
            for s, n in lens.items():
                for t in cache.k + cache.v:
                    t[s, n - 1] = torch.randn(2, 16)
            q = torch.randn(len(slots), 1, 4, 16)
            for layer in range(2):
                out = attention.decode(q, cache.k[layer], cache.v[layer], list(lens.values()), slots=slots)
                for i, (s, n) in enumerate(lens.items()):
                    want = reference(q[i], cache.k[layer][s, :n], cache.v[layer][s, :n], 16 ** -0.5, None)
                    torch.testing.assert_close(out[i].double(), want, rtol=1e-5, atol=1e-6)


def test_a_sleeping_cache_refuses_use_and_still_reports():
    with small_cache() as cache:
        a = cache.alloc_slot()
        cache.step({a: 20})
        cache.sleep(keep=True)
        for call in (lambda: cache.step({a: 30}), lambda: cache.step_async({a: 30}), cache.alloc_slot,
                     lambda: cache.free_slot(a), cache.trim, lambda: cache.reserve(P), cache.free_tokens,
                     lambda: cache.can_admit(1), lambda: cache.mapped_tokens(a), lambda: cache.slot_mapped_bytes(a)):
            with pytest.raises(CacheAsleep, match="wake"):
                call()
        assert cache.seq_len(a) == 20 and cache.stats()["mapped_bytes"] == 0
        cache.sleep(keep=True)  # again: nothing left to release, nothing changes
        cache.wake()
        cache.wake()  # awake: nothing to do
        assert cache.mapped_tokens(a) == 32


def test_sleep_without_keep_refuses_while_requests_run_and_changes_nothing():
    with small_cache() as cache:
        a = cache.alloc_slot()
        cache.step({a: 20})
        write(cache, a, 1, 0, 20)
        before = cache.stats()
        with pytest.raises(ValueError, match=r"slots \[0\].*keep=True"):
            cache.sleep()
        assert not cache.asleep and cache.stats() == before
        check(cache, a, 1, 20)
        with pytest.raises(ValueError, match="keep"):
            cache.sleep(keep="yes")


def test_wake_that_cannot_have_its_memory_stays_asleep_and_maps_nothing():
    """While asleep another cache takes the shared budget: wake raises OutOfPages, having mapped
    nothing; once the memory is back, wake restores the data."""
    budget = MemoryBudget(32 * P)

    def make():
        return KVCache(2, 1, 64, 4, 128, torch.float32, device="cpu", page_size=P, backend="host",
                       memory_budget=budget)

    with make() as x, make() as y:
        a = x.alloc_slot()
        x.step({a: 64})  # 16 pages
        write(x, a, 1, 0, 64)
        x.sleep(keep=True)
        assert budget.used() == 0  # sleep gave the shared budget everything back
        b = y.alloc_slot()
        y.step({b: 80})  # 20 pages: 12 left, x needs 16
        with pytest.raises(OutOfPages):
            x.wake()
        assert x.asleep and x.stats()["mapped_bytes"] == 0 and budget.used() == 20 * P
        check_cache(x)
        y.free_slot(b)
        y.trim()
        x.wake()
        check(x, a, 1, 64)
        check_cache(x)


@pytest.mark.parametrize("where", ["driver", "backend-and-pool"])
def test_a_failure_at_any_call_of_sleep_or_wake_leaves_the_books_true_and_a_retry_finishes(where):
    fired, at = 0, 0
    while True:
        at += 1
        cache = small_cache(budget_pages=40)
        try:
            a = _busy(cache)
            injector = Injector(at)
            with pytest.MonkeyPatch.context() as mp:
                if where == "driver":
                    injector.install(mp, libc, HOST_DRIVER_CALLS)
                else:
                    injector.install(mp, cache.backend, BACKEND_CALLS)
                    injector.install(mp, cache.pool, POOL_CALLS)
                try:
                    cache.sleep(keep=True)
                    cache.wake()
                except KeyboardInterrupt:
                    pass
            check_cache(cache)
            if not injector.fired:
                break
            fired += 1
            if cache.asleep:
                cache.sleep(keep=True)  # finishes releasing what the failure left
                assert cache.backend.allocated_bytes() == 0
                cache.wake()
            check(cache, a, 1, cache.mapped_tokens(a))
            check_cache(cache)
            cache.step({a: 128})  # and it serves on
            write(cache, a, 1, 80, 128)
            check(cache, a, 1, 128)
        finally:
            cache.close()
    assert fired >= 3


@pytest.mark.gpu
def test_cuda_graph_captured_before_sleep_replays_after_wake():
    """cuda-vmm: a graph that reads and writes the cache, captured before sleep(keep=True),
    replays after wake on the same addresses and the restored data."""
    from pyvattn import backends

    if not torch.cuda.is_available():
        pytest.skip("no CUDA device visible to torch")
    probe = backends.probe("cuda-vmm", torch.device("cuda"))
    if not probe.available:
        pytest.skip(f"cuda-vmm unavailable: {probe.reason}")
    with KVCache(2, 8, 128, 4, 4096, torch.float16, device="cuda", backend="cuda-vmm") as cache:
        s = cache.alloc_slot()
        cache.step({s: 1000})
        for t in cache.k + cache.v:
            t[s, :1000] = torch.randn(1000, 8, 128, device="cuda", dtype=torch.float16)
        kept = [t[s, :1000].clone() for t in cache.k + cache.v]
        out = torch.empty(1000, 8, 128, device="cuda", dtype=torch.float32)
        stream = torch.cuda.Stream()
        with torch.cuda.stream(stream):
            torch.add(cache.k[1][s, :1000].float(), cache.v[0][s, :1000].float(), out=out)  # warm up
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            torch.add(cache.k[1][s, :1000].float(), cache.v[0][s, :1000].float(), out=out)
            cache.k[0][s, 999].mul_(2)
        ptrs = _pointers(cache)
        cache.sleep(keep=True)
        assert cache.stats()["physical_bytes"] == 0
        cache.wake()
        assert _pointers(cache) == ptrs
        graph.replay()
        torch.cuda.synchronize()
        torch.testing.assert_close(out, kept[1].float() + kept[2].float())
        assert torch.equal(cache.k[0][s, 999], kept[0][999] * 2)
        assert torch.equal(cache.k[0][s, :999], kept[0][:999])


def test_sleep_and_wake_from_another_thread_while_one_decodes_in_the_background():
    """One thread steps with step_async and writes each token; another sleeps and wakes the cache,
    often while a background mapping is pending. The threads share a lock only around touching
    the tensors (memory is unmapped while asleep: the caller must not write it then); every cache
    call either runs whole or raises CacheAsleep, and no token is lost."""
    import threading

    with small_cache() as cache:
        a = cache.alloc_slot()
        cache.step({a: 1})
        write(cache, a, 1, 0, 1)
        done, errors, n, tensors = threading.Event(), [], [1], threading.Lock()

        def decode():
            try:
                while n[0] < 96:  # the budget: 6 pages a region
                    try:
                        cache.step_async({a: n[0] + 1})
                        with tensors:
                            cache.mapped_tokens(a)  # waits for the mapping; CacheAsleep if asleep
                            write(cache, a, 1, n[0], n[0] + 1)
                        n[0] += 1
                    except CacheAsleep:
                        pass
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)
            finally:
                done.set()

        worker = threading.Thread(target=decode)
        worker.start()
        sleeps = 0
        while not done.is_set():
            with tensors:
                cache.sleep(keep=True)
            cache.wake()
            sleeps += 1
        worker.join()
        assert not errors and sleeps > 0
        check(cache, a, 1, 96)
        check_cache(cache)


def test_closing_a_sleeping_cache_gives_everything_back():
    budget = MemoryBudget(None)
    cache = KVCache(2, 1, 64, 4, 128, torch.float32, device="cpu", page_size=P, backend="host",
                    memory_budget=budget)
    a = cache.alloc_slot()
    cache.step({a: 50})
    cache.sleep(keep=True)
    backend = cache.backend
    cache.close()
    assert backend._fd == -1 and not backend._tables and budget.rows() == []
    with pytest.raises(RuntimeError, match="closed"):
        cache.wake()

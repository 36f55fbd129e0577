"""Fault injection: raise at the n-th call of a set of functions (driver calls, backend and pool
methods), and a KVCache workload that keeps a model of what each request wrote, to check after
every injected failure that the books equal reality and no written token changed."""

from __future__ import annotations

import errno
import threading
from typing import Callable

import numpy as np
import pytest

from books import check_cache
from kvdata import check, write
from pyvattn.errors import DriverError, OSCallError, PyvattnError


class Injector:
    """Counts calls to every function it wraps (on any thread) and makes call number ``at``
    (1-based) fail, or every call from ``at`` on when ``persistent``. ``fail(name, fn, args)``
    decides how a call fails (raise, or return a failure status); by default it raises ``error``.
    """

    def __init__(self, at: int, error: BaseException | None = None, persistent: bool = False,
                 fail: Callable | None = None):
        self.at, self.persistent = at, persistent
        self.error = error if error is not None else KeyboardInterrupt()
        self.fail = fail or self._raise
        self.calls = 0
        self.fired = 0
        self.enabled = True
        self._lock = threading.Lock()

    def _raise(self, name, fn, args):
        raise self.error

    def wrap(self, name: str, fn: Callable) -> Callable:
        def call(*args, **kwargs):
            with self._lock:
                self.calls += 1
                now = self.enabled and (self.calls == self.at or (self.persistent and self.calls > self.at))
                self.fired += now
            if now:
                return self.fail(name, fn, args)
            return fn(*args, **kwargs)
        return call

    def install(self, monkeypatch, target, names) -> None:
        for name in names:
            monkeypatch.setattr(target, name, self.wrap(name, getattr(target, name)))


def libc_fails_like_the_os(name, fn, args):
    """A libc call failing as the OS does: ``raw_mmap`` returns MAP_FAILED with ENOMEM, the
    checked wrappers raise ``OSCallError(ENOMEM)``."""
    from pyvattn._ffi import libc

    libc.ffi.errno = errno.ENOMEM
    if name == "raw_mmap":
        return libc.MAP_FAILED
    libc.check(name, -1)


HOST_DRIVER_CALLS = ("raw_mmap", "mmap", "munmap", "fallocate")
BACKEND_CALLS = ("map", "unmap", "create_pages", "release_pages")
POOL_CALLS = ("take", "stock", "reserve", "trim")
EXPECTED = (KeyboardInterrupt, PyvattnError, DriverError, OSCallError, RuntimeError)


class Workload:
    """A fixed sequence of cache operations that maps, grows, runs a step in the background,
    reuses a slot, reclaims under the budget, reserves, trims and frees, writing every token it
    steps to (unless ``data`` is False). ``written`` is the model: slot -> (tag, tokens written),
    updated only when an operation succeeded. Sized for 16 tokens per page, 4 regions, 4 slots and
    a budget of 48 pages."""

    def __init__(self, cache, data: bool = True):
        self.cache, self.data = cache, data
        self.written: dict[int, tuple[int, int]] = {}
        self.tags = 0

    def alloc(self, seq_len: int = 0) -> int:
        slot = self.cache.alloc_slot(seq_len=seq_len)
        self.tags += 1
        self.written[slot] = (self.tags, 0)
        return slot

    def grow(self, lens: dict[int, int], background: bool = False) -> None:
        if background:
            self.cache.step_async(lens)
            self.cache.seq_len(next(iter(lens)))  # waits, and raises the background error
        else:
            self.cache.step(lens)
        for slot, n in lens.items():
            tag, done = self.written[slot]
            if n > done:
                if self.data:
                    write(self.cache, slot, tag, done, n)
                self.written[slot] = (tag, n)

    def free(self, slot: int) -> None:
        self.written.pop(slot)  # freed whatever happens after this point
        self.cache.free_slot(slot)

    def run(self) -> None:
        c, P = self.cache, self.cache.page_size
        c.reserve(12 * P)  # placed where the first steps will map
        a = self.alloc()
        self.grow({a: 40})
        b = self.alloc()
        self.grow({a: 70, b: 50})
        self.grow({a: 100, b: 60}, background=True)
        self.free(a)
        d = self.alloc(seq_len=30)  # best fit: a's slot and pages
        self.grow({d: 30, b: 130})  # over the budget: reclaims d's pages beyond its length
        c.trim()
        self.free(b)
        self.grow({d: 160})  # reclaims the freed b's pages

    def check_data(self) -> None:
        for slot, (tag, n) in self.written.items():
            if self.data and self.cache._slots.active[slot] and n:
                check(self.cache, slot, tag, n)

    def finish(self) -> None:
        """After a failure: the requests finish, the cache still serves a new one end to end
        (reclaiming what they left), and gives everything back."""
        self.check_data()
        for s in list(self.written):
            if self.cache._slots.active[s]:
                self.free(s)
        self.written.clear()
        served = self.serve_new()
        self.check_data()
        for slot in served:
            self.free(slot)
        self.cache.trim()

    def serve_new(self) -> list[int]:
        """The new requests ``finish`` serves end to end (their slots, to be freed)."""
        slot = self.alloc()
        self.grow({slot: 90})
        return [slot]


class ForkWorkload(Workload):
    """The Workload with prefix sharing (issue 14): a request forks another's prefix (whole pages
    shared, the last one copied), both grow, the source finishes first and a new prompt takes its
    slot over in place, another prompt forks a running request's prefix, then everything finishes
    and is reclaimed. The model keeps, per slot, which tag each token range holds: ``inherited``
    ranges below ``written``'s own. Sized for 16 tokens per page, 4 regions, 4 slots of 256
    tokens and a budget of 64 pages."""

    def __init__(self, cache, data: bool = True):
        super().__init__(cache, data)
        self.inherited: dict[int, list[tuple[int, int, int]]] = {}  # slot -> [(tag, start, stop)]
        self.retained: dict[int, list[tuple[int, int, int]]] = {}  # finished slot -> what it held
        self.own_from: dict[int, int] = {}  # slot -> first token it wrote itself

    def content(self, slot: int, stop: int, live: bool = True) -> list[tuple[int, int, int]]:
        """The (tag, start, stop) ranges of ``slot``'s tokens ``[0, stop)``."""
        if not live:
            return [(t, a, min(b, stop)) for t, a, b in self.retained[slot] if a < stop]
        tag, done = self.written[slot]
        out = [(t, a, min(b, stop)) for t, a, b in self.inherited[slot] if a < stop]
        if self.own_from[slot] < min(done, stop):
            out.append((tag, self.own_from[slot], min(done, stop)))
        return out

    def alloc(self, seq_len: int = 0, tokens=None, source: int | None = None) -> int:
        slot = self.cache.alloc_slot(seq_len=seq_len, tokens=tokens)
        cached = self.cache.cached_tokens(slot)
        self.tags += 1
        inherited = []
        if cached:
            inherited = self.content(source, cached, live=source in self.written and source != slot)
        self.inherited[slot], self.own_from[slot] = inherited, cached
        self.written[slot] = (self.tags, cached)
        return slot

    def fork(self, src: int, num_tokens: int) -> int:
        slot = self.cache.fork(src, num_tokens)
        self.tags += 1
        self.inherited[slot], self.own_from[slot] = self.content(src, num_tokens), num_tokens
        self.written[slot] = (self.tags, num_tokens)
        return slot

    def free(self, slot: int) -> None:
        self.retained[slot] = self.content(slot, self.written[slot][1])
        super().free(slot)

    def run(self) -> None:
        c, P = self.cache, self.cache.page_size
        prompt = np.arange(200) + 1000
        c.reserve(8 * P)
        a = self.alloc(tokens=prompt[:70])
        self.grow({a: 70})
        b = self.fork(a, 37)  # two pages shared in every region, the third copied
        self.grow({a: 90, b: 60}, background=True)
        self.free(a)  # b still maps a's first two pages
        d = self.alloc(tokens=prompt[:100], source=a)  # a's slot, taken over in place: 64 cached
        self.grow({d: 100, b: 100})  # the budget's last pages
        e = self.alloc(tokens=prompt[:90], source=d)  # forks the running d's prefix
        self.grow({e: 110})
        self.free(b)
        c.trim()
        self.free(d)
        self.grow({e: 256})  # reclaims d's own pages; those e shares stay

    def check_data(self) -> None:
        for slot in self.written:
            if self.data and self.cache._slots.active[slot]:
                for tag, lo, hi in self.content(slot, self.written[slot][1]):
                    check(self.cache, slot, tag, hi, lo)

    def serve_new(self) -> list[int]:
        slot = self.alloc()
        self.grow({slot: 90})
        other = self.fork(slot, 50)
        self.grow({other: 70})
        return [slot, other]


def sweep(make_cache, install, *, error=None, persistent=False, fail=None, data=True,
          reality=None, after_close=None, before_each=None, workload=Workload) -> int:
    """Run the Workload once per call index of a clean run, with a failure injected there by
    ``install(monkeypatch, cache, injector)``; after each: the books against reality
    (``check_cache``, and ``reality(cache)`` for what only the test knows, such as a stub
    driver's state), the data, the cache serving a new request, then ``close`` and
    ``after_close(backend)``. ``workload``: a :class:`Workload` (sub)class. Returns how many runs
    saw the failure."""
    def one(at: int) -> Injector:
        if before_each is not None:
            before_each(at)
        cache = make_cache()
        work = workload(cache, data)
        injector = Injector(at, error, persistent and at > 0, fail)  # at 0: a clean run
        with pytest.MonkeyPatch.context() as mp:
            install(mp, cache, injector)
            try:
                work.run()
            except EXPECTED:
                pass
        if at:
            for check_books in (check_cache, reality or (lambda c: None)):
                check_books(cache)
            work.check_data()
            work.finish()
            check_cache(cache)
        backend = cache.backend
        cache.close()
        if after_close is not None:
            after_close(backend)
        return injector

    calls = one(0).calls  # a clean run, counting the calls
    return sum(one(at).fired > 0 for at in range(1, calls + 1))

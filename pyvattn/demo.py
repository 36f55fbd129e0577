"""python -m pyvattn demo: KV tensors growing for requests from a real trace.

A small continuous-batching loop over a real KVCache: requests from the trace are admitted while
request slots and the memory budget allow, prefilled, then decoded one token per step; a finished
request frees its slot. Every token's K and V is written with a value derived from (request,
layer, position) and checked when the request finishes, so the demo also shows that growth, reuse
and reclaim never lose data. Where the memory goes is printed as it runs (see LEGEND), beside what
static reservation (max_seq_len tokens per request) would need for the same requests.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import deque
from dataclasses import dataclass

import torch
from tqdm import tqdm

from .errors import OutOfPages, PyvattnError
from .frag.traces import load_trace
from .kvcache import KVCache
from .units import format_size

LEGEND = """\
Columns (bytes hold K and V of every layer):
  run/wait/done  requests running, waiting to be admitted, finished
  in use         tokens written by running requests
  frag           internal fragmentation of running requests: the unwritten rest of the pages
                 their lengths need (each layer's partly filled last page)
  retained       mapped, and needed by no running request: finished requests' pages kept for
                 the next request in their slot, and pages a reused slot holds beyond its
                 length (deferred reclaim: reclaimed at once when memory runs short)
  pool           physical pages created and not mapped anywhere
  physical       all physical memory held = in use + frag + retained + pool (at most the budget)
  static         what static reservation (max_seq_len tokens per request) needs for the same
                 running requests; * marks more than the budget: they could not run at once
  waits for      why the next waiting request is not running: a free slot, or memory
"""

ROW = "{:>6} {:>4} {:>4} {:>4} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10} {:>9}  {}"
PROGRESS_SECONDS = 3.0
MiB = 1 << 20  # a row at least this often through long stretches without a finish


def print_now(*args, **kwargs) -> None:
    """print, flushed at once: rows appear as they happen when stdout is a pipe (make demo | tee)."""
    print(*args, **kwargs, flush=True)


class DemoError(ValueError):
    """An argument the demo cannot run with (printed as one line, exit status 2)."""


@dataclass
class Request:
    rid: int
    prompt: int
    total: int
    pos: int = 0  # tokens written so far


@dataclass(frozen=True)
class MemorySplit:
    """Where a cache's physical memory is, in bytes (KVCache.stats()'s split of what is mapped,
    plus the pool's pages mapped nowhere)."""

    in_use: int
    fragmentation: int
    retained: int
    pool: int
    physical: int

    @classmethod
    def of(cls, cache: KVCache) -> MemorySplit:
        s = cache.stats()
        return cls(in_use=s["used_bytes"], fragmentation=s["fragmentation_bytes"], retained=s["retained_bytes"],
                   pool=s["physical_bytes"] - s["mapped_bytes"], physical=s["physical_bytes"])


class StaticReservation:
    """The baseline: every running request holds max_seq_len tokens of K and V in every layer."""

    def __init__(self, cache: KVCache, budget: int):
        self.per_request = cache.max_seq_len * cache.token_bytes * cache.num_regions
        self.budget = budget
        self.capacity = min(cache.max_batch_size, budget // self.per_request)  # requests at once

    def needs(self, running: int) -> str:
        nbytes = running * self.per_request
        return format_size(nbytes) + ("*" if nbytes > self.budget else "")


def _pattern(rid: int, layer: int, start: int, stop: int, kind: int) -> torch.Tensor:
    """Values for tokens [start, stop) that are exact in fp16 and differ per request/layer/K-V."""
    t = torch.arange(start, stop, dtype=torch.int64)
    return ((t * 31 + rid * 17 + layer * 7 + kind * 3) % 2039).to(torch.float32)


class Writer:
    """Writes and checks the demo's K/V pattern for one request slot."""

    def __init__(self, cache: KVCache):
        self.cache = cache

    def write(self, slot: int, r: Request, start: int, stop: int) -> None:
        for layer in range(self.cache.num_layers):
            for kind, t in enumerate((self.cache.k[layer], self.cache.v[layer])):
                t[slot, start:stop] = _pattern(r.rid, layer, start, stop, kind)[:, None, None].to(t.dtype)

    def check(self, slot: int, r: Request) -> bool:
        for layer in range(self.cache.num_layers):
            for kind, t in enumerate((self.cache.k[layer], self.cache.v[layer])):
                got = t[slot, : r.total].float().cpu()
                want = _pattern(r.rid, layer, 0, r.total, kind)[:, None, None].expand_as(got)
                if not torch.equal(got, want):
                    return False
        return True


def request_bytes(cache: KVCache, tokens: int) -> int:
    """Physical memory one request of ``tokens`` tokens maps (whole pages, K and V, all layers)."""
    return -(-tokens * cache.token_bytes // cache.page_size) * cache.page_size * cache.num_regions


class Demo:
    """The serving loop, its table and its summary."""

    def __init__(self, cache: KVCache, requests: list[Request], out=print_now):
        self.cache, self.out = cache, out
        self.budget = cache.stats()["budget_pages"] * cache.page_size
        self.static = StaticReservation(cache, self.budget)
        self.writer = Writer(cache)
        self.waiting = deque(requests)
        self.running: dict[int, Request] = {}
        self.step = self.done = self.bad = self.preempted = self.peak_running = 0
        self.waits_for = "-"
        self.held = False  # after a preemption, admit nothing until a request finishes
        self.busiest: tuple[int, MemorySplit] | None = None  # (running, split) with most running
        largest = max(requests, key=lambda r: r.total)
        need = request_bytes(cache, largest.total)
        if need > self.budget:
            raise DemoError(
                f"--budget {format_size(self.budget)} is too small for one request: request {largest.rid} "
                f"({largest.total} tokens) maps {format_size(need)} in {cache.num_layers} layers with "
                f"{format_size(cache.page_size)} pages; pass --budget {-(-need // MiB)}MiB or more, or fewer --layers")

    def run(self) -> int:
        tokens = sum(r.total for r in self.waiting)
        t0 = last_row = time.perf_counter()
        self.out(LEGEND)
        header = ROW.format("step", "run", "wait", "done", "in use", "frag", "retained", "pool", "physical",
                            "static", "waits for", "")
        self.out(header.rstrip() + "\n" + "-" * len(header.rstrip()))
        with tqdm(total=tokens, unit="tok", desc="K/V written", leave=False, disable=None, file=sys.stderr) as bar:
            while self.waiting or self.running:
                admitted = self._admit()
                preempted = self._grow(admitted)
                if preempted is not None:
                    self._row(f"request {preempted.rid} preempted: its next token did not fit", bar)
                    continue
                bar.update(self._write(admitted))
                finished = self._finish()
                now = time.perf_counter()
                if finished or admitted or self.step == 0 or now - last_row > PROGRESS_SECONDS:
                    self._row(f"{finished} finished" if finished else
                              f"{len(admitted)} admitted" if admitted else "decoding", bar)
                    last_row = now
                self.step += 1
        elapsed = time.perf_counter() - t0
        self.cache.trim()
        self._row("after trim(): pages of finished requests released", None)
        self._summary(elapsed)
        return 1 if self.bad else 0

    # --- one step of the loop ------------------------------------------------------------------
    def _admit(self) -> list[int]:
        """Admit waiting requests while a slot is free and the prompt fits in memory (and no
        request was preempted since the last one finished: it would only be preempted again)."""
        admitted = []
        while self.waiting and len(self.running) < self.cache.max_batch_size:
            if self.held:
                self.waits_for = "memory"
                break
            r = self.waiting[0]
            slot = self.cache.alloc_slot(r.prompt)
            lens = {s: q.pos + 1 for s, q in self.running.items()} | {slot: r.prompt}
            try:
                self.cache.step(lens)  # all or nothing: on OutOfPages nothing was mapped
            except OutOfPages:
                self.cache.free_slot(slot)
                if not self.running:  # cannot happen after the budget check; never spin on it
                    raise DemoError(f"request {r.rid} does not fit in --budget {format_size(self.budget)} alone") \
                        from None
                self.waits_for = "memory"
                break
            self.waiting.popleft()
            self.running[slot] = r
            admitted.append(slot)
        else:
            self.waits_for = "a slot" if self.waiting else "-"
        self.peak_running = max(self.peak_running, len(self.running))
        return admitted

    def _grow(self, admitted: list[int]) -> Request | None:
        """Map this step's growth. If it does not fit, preempt the newest request (back to the
        head of the queue, to be prefilled again) and return it."""
        try:
            self.cache.step({s: r.prompt if s in admitted else r.pos + 1 for s, r in self.running.items()})
            return None
        except OutOfPages:
            if len(self.running) == 1:  # cannot happen after the budget check; never spin on it
                r = next(iter(self.running.values()))
                raise DemoError(f"request {r.rid} cannot grow within --budget {format_size(self.budget)}") from None
            slot = max(self.running, key=lambda s: self.running[s].rid)
            r = self.running.pop(slot)
            self.cache.free_slot(slot)
            r.pos = 0
            self.waiting.appendleft(r)
            self.preempted += 1
            self.held = True
            self.waits_for = "memory"
            return r

    def _write(self, admitted: list[int]) -> int:
        written = 0
        for slot, r in self.running.items():
            stop = r.prompt if slot in admitted else r.pos + 1
            self.writer.write(slot, r, r.pos, stop)
            written += stop - r.pos
            r.pos = stop
        return written

    def _finish(self) -> int:
        finished = [s for s, r in self.running.items() if r.pos >= r.total]
        for slot in finished:
            self.bad += not self.writer.check(slot, self.running[slot])
            self.cache.free_slot(slot)
            del self.running[slot]
            self.done += 1
            self.held = False
        return len(finished)

    # --- output -------------------------------------------------------------------------------
    def _row(self, note: str, bar) -> None:
        m = MemorySplit.of(self.cache)
        if self.busiest is None or len(self.running) > self.busiest[0]:
            self.busiest = (len(self.running), m)
        line = ROW.format(self.step, len(self.running), len(self.waiting), self.done, format_size(m.in_use),
                          format_size(m.fragmentation), format_size(m.retained), format_size(m.pool),
                          format_size(m.physical), self.static.needs(len(self.running)), self.waits_for,
                          note).rstrip()
        if bar is not None and not bar.disable:
            bar.write(line, file=sys.stdout)
        else:
            self.out(line)

    def _summary(self, elapsed: float) -> None:
        s = self.cache.stats()
        self.out(f"\n{self.done} requests in {self.step} steps ({elapsed:.1f} s); preemptions: {self.preempted}")
        self.out(f"at most {self.peak_running} requests ran at once in {format_size(self.budget)}; static "
                 f"reservation ({format_size(self.static.per_request)} per request) fits {self.static.capacity}")
        if self.busiest is not None:
            n, m = self.busiest
            mapped = m.in_use + m.fragmentation + m.retained
            self.out(f"with {n} running: in use {format_size(m.in_use)}, frag {format_size(m.fragmentation)} "
                     f"({m.fragmentation / mapped:.1%} of mapped), retained {format_size(m.retained)}")
        self.out(f"map calls: {s['map_calls']}, pages mapped: {s['mapped_pages_total']}, "
                 f"reclaimed: {s['reclaimed_pages_total']}, mapping time: {s['map_seconds'] * 1e3:.1f} ms")
        self.out("data check: " + (f"{self.bad} requests CORRUPTED" if self.bad
                                   else "all K/V values read back as written"))


def _requests(args: argparse.Namespace) -> tuple[list[Request], int]:
    """The trace's first requests, clamped to max_seq_len; also how many were clamped."""
    rows = load_trace(args.trace, args.requests)
    requests, clamped = [], 0
    for i, row in enumerate(rows):
        total = min(row.prompt_tokens + row.output_tokens, args.max_seq_len)
        clamped += total < row.prompt_tokens + row.output_tokens
        requests.append(Request(i, min(row.prompt_tokens, total - 1), total))
    return requests, clamped


def _open_cache(args: argparse.Namespace) -> KVCache:
    m = args.model
    dtype = {2: torch.float16, 4: torch.float32}.get(m.dtype_bytes)
    if dtype is None:
        raise DemoError(f"--model {m.name}: {m.dtype_bytes}-byte elements are not supported here (2 or 4)")
    return KVCache(args.layers, m.num_kv_heads, m.head_dim, args.max_batch, args.max_seq_len, dtype=dtype,
                   device=args.device, page_size=args.page_size, backend=args.backend, memory_budget=args.budget)


def run(args: argparse.Namespace, out=print_now) -> int:
    """Run the demo for parsed command-line ``args``; 0 if every value read back as written."""
    try:
        requests, clamped = _requests(args)
        if not requests:
            raise DemoError(f"--trace {args.trace} has no requests")
        cache = _open_cache(args)
    except (ValueError, PyvattnError) as exc:  # bad arguments, or a backend that cannot run here
        print(f"python -m pyvattn demo: error: {exc}", file=sys.stderr)
        return 2
    try:
        demo = Demo(cache, requests, out)
        out(f"{cache!r}\n{cache.selection.name} backend: {cache.selection.reason}")
        out(f"{len(requests)} requests from trace '{args.trace}'"
            + (f" ({clamped} cut to --max-seq-len {args.max_seq_len})" if clamped else "")
            + f"; {args.model.name} shape, {args.layers} layers; {format_size(cache.page_size)} pages = "
            f"{cache.page_size // cache.token_bytes} tokens per layer")
        out(f"virtual: {format_size(cache.stats()['reserved_bytes'])} reserved for {args.max_batch} slots x "
            f"{args.max_seq_len} tokens; physical budget {format_size(demo.budget)}; static reservation: "
            f"{format_size(demo.static.per_request)} per request, {demo.static.capacity} at once\n")
        return demo.run()
    except DemoError as exc:
        print(f"python -m pyvattn demo: error: {exc}", file=sys.stderr)
        return 2
    finally:
        cache.close()

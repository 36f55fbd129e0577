#!/usr/bin/env python3
"""Host-backend benchmark: mapping throughput, step() cost, and overhead over the bare mmap calls.

Also, side by side in one run: the decode hot path at batch 256 (a step that maps nothing, dict
and tensor input, against a bare ``all(n <= cap[s] for s, n in d.items())`` over the same dict,
and the lock every call takes), and the one run-finder (``backends.base.runs``) against a plain
Python loop. Prints tables and saves JSON: bench-results/bench_host.json (git-ignored), or with
--save the committed benchmarks/results/bench_host.json. Ratios are measured side by side in one
run; absolute times are this machine's and only indicative.

    python scripts/bench_host.py [--layers 32] [--repeat 7] [--save | --out PATH]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import resultpath
from pyvattn import KVCache
from pyvattn._ffi import libc
from pyvattn.backends.base import runs


def median_time(fn, repeat: int, setup=None) -> float:
    """Median seconds of ``fn()`` over ``repeat`` runs, each after ``setup()`` (not timed)."""
    times = []
    for _ in range(repeat):
        if setup:
            setup()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


class MmapRecorder:
    """Records the mmap calls pyvattn makes, so they can be replayed bare (raw cffi, no Python
    logic around them) on the same addresses for the overhead ratio."""

    def __init__(self):
        self.calls: list[tuple] = []
        self._orig = libc.raw_mmap

    def __enter__(self):
        def recording(*args):
            self.calls.append(args)
            return self._orig(*args)

        libc.raw_mmap = recording
        return self

    def __exit__(self, *exc):
        libc.raw_mmap = self._orig


def replay(calls) -> None:
    raw = libc.raw_mmap
    for args in calls:
        raw(*args)


def make_cache(layers: int, batch: int) -> KVCache:
    # Llama-3-8B per-layer shape: 8 KV heads x 128, fp16 -> 2 KiB per token; 64 KiB = 32 tokens.
    # No deferred reclaim, so freeing a slot unmaps it and the growth can be measured again.
    return KVCache(layers, 8, 128, batch, 4096, torch.float16, device="cpu", page_size="64KiB",
                   deferred_reclaim=False)


class OnePageGrowth:
    """A batch whose every request holds one page per layer and is about to need a second."""

    def __init__(self, cache: KVCache, batch: int):
        self.cache, self.batch = cache, batch
        self.tpp = cache.page_size // cache.token_bytes
        cache.reserve(batch * 2 * cache.num_regions * cache.page_size)  # creation is not timed
        self.slots: list[int] = []
        self.grow = {}

    def setup(self) -> None:
        for s in self.slots:
            self.cache.free_slot(s)  # unmaps (deferred_reclaim=False)
        self.slots = [self.cache.alloc_slot() for _ in range(self.batch)]
        self.cache.step({s: self.tpp for s in self.slots})
        self.grow = {s: self.tpp + 1 for s in self.slots}

    def run(self) -> None:
        self.cache.step(self.grow)


def bench_step(layers: int, batch: int, repeat: int) -> dict:
    """step() cost at ``batch`` requests: (a) no page needed, (b) one new page per request."""
    cache = make_cache(layers, batch)
    g = OnePageGrowth(cache, batch)
    g.setup()
    lens = {s: g.tpp for s in g.slots}
    lens_tensor = torch.zeros(cache.max_batch_size, dtype=torch.int32)
    lens_tensor[g.slots] = g.tpp
    inner = 1000
    no_new = median_time(lambda: [cache.step(lens) for _ in range(inner)], repeat) / inner
    no_new_t = median_time(lambda: [cache.step(lens_tensor) for _ in range(inner)], repeat) / inner
    with_new = median_time(g.run, repeat, setup=g.setup)
    pages = batch * cache.num_regions
    cache.close()
    return {"batch": batch, "layers": layers, "step_no_new_page_us": no_new * 1e6,
            "step_no_new_page_tensor_input_us": no_new_t * 1e6,
            "step_one_new_page_per_request_us": with_new * 1e6, "pages_per_growth_step": pages,
            "pages_per_second": pages / with_new}


def bench_overhead(layers: int, batch: int, repeat: int) -> dict:
    """pyvattn's step() mapping one page per request vs the identical mmap calls made bare."""
    cache = make_cache(layers, batch)
    g = OnePageGrowth(cache, batch)
    g.setup()
    with MmapRecorder() as rec:
        g.run()
    calls = list(rec.calls)
    t_pyvattn, t_bare = [], []
    for _ in range(repeat):  # interleaved, so both see the same machine state
        g.setup()
        t0 = time.perf_counter()
        g.run()
        t_pyvattn.append(time.perf_counter() - t0)
        g.setup()  # the same VAs are unmapped again: replay exactly the calls step() made
        t0 = time.perf_counter()
        replay(calls)
        t_bare.append(time.perf_counter() - t0)
        g.run()  # the replay mapped what pyvattn does not know about; mapping over it is allowed
    pages = batch * cache.num_regions
    cache.close()
    py, bare = statistics.median(t_pyvattn), statistics.median(t_bare)
    return {"pages": pages, "mmap_calls": len(calls), "pyvattn_us_per_page": py / pages * 1e6,
            "bare_mmap_us_per_page": bare / pages * 1e6, "overhead_ratio": py / bare}


def bench_first_touch(layers: int, batch: int, repeat: int) -> dict:
    """The growth step of ``batch`` requests by one page, then the first and the second write of
    every token of those pages: with pages populated when mapped (MAP_POPULATE), the first write
    takes no page faults and costs what the second does. Best of ``repeat``."""
    cache = make_cache(layers, batch)
    g = OnePageGrowth(cache, batch)
    x = torch.ones(batch, g.tpp, cache.num_kv_heads, cache.head_dim, dtype=cache.dtype)
    best = {"step_ms": float("inf"), "first_write_ms": float("inf"), "second_write_ms": float("inf")}

    def write_new_page() -> None:
        for t in (*cache.k, *cache.v):
            t[g.slots, g.tpp:2 * g.tpp] = x

    for _ in range(repeat):
        g.setup()
        marks = [time.perf_counter()]
        g.run()
        marks.append(time.perf_counter())
        write_new_page()
        marks.append(time.perf_counter())
        write_new_page()
        marks.append(time.perf_counter())
        for key, a, b in zip(best, marks, marks[1:]):
            best[key] = min(best[key], (b - a) * 1e3)
    cache.close()
    return {"batch": batch, **best}


def best_of_rounds(fns: dict, rounds: int, calls: int = 200) -> dict:
    """Microseconds per call of each function: the best of ``rounds`` rounds of ``calls`` calls,
    the functions interleaved round by round so that all see the same machine state."""
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(rounds):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            for _ in range(calls):
                fn()
            best[name] = min(best[name], (time.perf_counter() - t0) / calls * 1e6)
    return best


def bench_hot_path(layers: int, batch: int, rounds: int) -> dict:
    """A decode step that maps nothing, at ``batch``: dict and tensor input, beside the bare check
    the dict path is held to and the lock every call takes."""
    cache = make_cache(layers, batch)
    slots = [cache.alloc_slot() for _ in range(batch)]
    tpp = cache.page_size // cache.token_bytes
    cache.step({s: tpp for s in slots})
    lens = {s: tpp - 1 - s % 7 for s in slots}
    cap = {s: cache.mapped_tokens(s) for s in slots}
    lens_tensor = torch.zeros(cache.max_batch_size, dtype=torch.int32)
    lens_tensor[slots] = torch.tensor([lens[s] for s in slots], dtype=torch.int32)
    lock = threading.Lock()

    def bare_all():
        return all(n <= cap[s] for s, n in lens.items())

    def lock_only():
        with lock:
            pass

    us = best_of_rounds({"bare_all": bare_all, "step_dict": lambda: cache.step(lens),
                         "step_tensor": lambda: cache.step(lens_tensor), "lock": lock_only}, rounds)
    cache.close()
    return {"batch": batch, "bare_all_us": us["bare_all"], "step_dict_us": us["step_dict"],
            "step_tensor_us": us["step_tensor"], "lock_us": us["lock"],
            "dict_over_bare": us["step_dict"] / us["bare_all"]}


def runs_in_python(vas, step: int):
    """The run-finder written as a plain loop, to measure runs() against."""
    starts, lengths, expect = [], [], None
    for v in sorted(vas):
        if v == expect:
            lengths[-1] += 1
        else:
            starts.append(v)
            lengths.append(1)
        expect = v + step
    return starts, lengths


def bench_runs(rounds: int) -> list[dict]:
    """runs() on decode-shaped batches (one page in each of n/64 slots of 64 regions, plus a
    contiguous stretch) against the loop."""
    out = []
    P = 64 << 10
    for n in (64, 1024, 16384):
        rng = np.random.default_rng(n)
        vas = (rng.permutation(n * 4)[:n] * P).tolist()
        us = best_of_rounds({"runs": lambda vas=vas: runs(vas, P), "loop": lambda vas=vas: runs_in_python(vas, P)},
                            rounds, calls=max(1, 2000 // n))
        out.append({"pages": n, "runs_us": us["runs"], "python_loop_us": us["loop"]})
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=32, help="layers of the cache (default: %(default)s)")
    ap.add_argument("--repeat", type=int, default=7, help="timed runs per measurement; medians are kept "
                    "(default: %(default)s)")
    resultpath.add_output_arguments(ap, "bench_host")
    args = ap.parse_args(argv)
    for name in ("layers", "repeat"):
        if getattr(args, name) < 1:
            ap.error(f"--{name} must be at least 1")

    steps = [bench_step(args.layers, b, args.repeat) for b in tqdm((1, 32, 256), desc="step()")]
    over = bench_overhead(args.layers, 256, args.repeat)
    hot = bench_hot_path(args.layers, 256, rounds=20 * args.repeat)
    touch = bench_first_touch(args.layers, 256, args.repeat)
    finder = bench_runs(rounds=3 * args.repeat)

    print(f"\nstep() on the host backend, {args.layers} layers, 64 KiB pages (32 tokens), fp16")
    print(f"{'batch':>6} {'no new page':>14} {'(tensor input)':>15} {'1 new page/request':>20} "
          f"{'pages mapped':>13} {'pages/s':>12}")
    for r in steps:
        print(f"{r['batch']:>6} {r['step_no_new_page_us']:>11.1f} us {r['step_no_new_page_tensor_input_us']:>12.1f} us "
              f"{r['step_one_new_page_per_request_us']:>17.1f} us "
              f"{r['pages_per_growth_step']:>13} {r['pages_per_second']:>12,.0f}")
    print(f"\nper-page cost, one decode-step growth of 256 requests ({over['pages']} pages, "
          f"{over['mmap_calls']} mmap calls)")
    print(f"  pyvattn step():         {over['pyvattn_us_per_page']:.2f} us/page")
    print(f"  same mmap calls, bare:  {over['bare_mmap_us_per_page']:.2f} us/page")
    print(f"  ratio:                  {over['overhead_ratio']:.2f}x  (goal < 1.5x)")
    print(f"\ndecode hot path, batch 256, a step that maps nothing (best of {20 * args.repeat} interleaved "
          f"rounds of 200 calls)")
    print(f"  bare all(n <= cap[s] for s, n in d.items()):  {hot['bare_all_us']:.2f} us")
    print(f"  step(dict):                                   {hot['step_dict_us']:.2f} us  "
          f"= {hot['dict_over_bare']:.2f}x the bare check (goal <= 1.5x: "
          f"{'met' if hot['dict_over_bare'] <= 1.5 else 'NOT met'})")
    print(f"  step(tensor):                                 {hot['step_tensor_us']:.2f} us  (goal < 10 us: "
          f"{'met' if hot['step_tensor_us'] < 10 else 'NOT met'})")
    print(f"  the lock every call takes (acquire+release):  {hot['lock_us']:.2f} us  "
          f"({hot['lock_us'] / hot['step_dict_us']:.1%} of step(dict))")
    print(f"\ngrowth of 256 requests by one page, then writing every token of the new pages (best of "
          f"{args.repeat})")
    print(f"  step():        {touch['step_ms']:8.1f} ms  (maps and populates the pages)")
    print(f"  first write:   {touch['first_write_ms']:8.1f} ms")
    print(f"  second write:  {touch['second_write_ms']:8.1f} ms  (first / second = "
          f"{touch['first_write_ms'] / touch['second_write_ms']:.2f}: no page faults left for the first)")
    print("\nruns(): the one run-finder, vectorised, against a plain Python loop (decode-shaped batches)")
    for r in finder:
        print(f"  {r['pages']:>6} pages: runs() {r['runs_us']:8.1f} us   loop {r['python_loop_us']:8.1f} us")

    result = {"machine": {"platform": platform.platform(), "processor": platform.processor(),
                          "python": sys.version.split()[0], "torch": torch.__version__,
                          "numpy": np.__version__},
              "layers": args.layers, "repeat": args.repeat, "step": steps, "overhead": over,
              "hot_path": hot, "first_touch": touch, "runs": finder}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nsaved {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

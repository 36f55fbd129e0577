#!/usr/bin/env python3
"""Per-call latency of the CUDA VMM driver calls, from 1 to 8 threads at once (table + JSON).

For each page size (2 MiB and multiples) and each thread count, every thread works on its own
pages in its own reservation, the threads in lockstep phase by phase (a barrier before each
timed phase), and every call is timed alone on the host (``perf_counter_ns`` around the cffi
call; cffi releases the GIL, so the threads are inside the driver at the same time):

    cuMemCreate
    cuMemMap
    cuMemSetAccess, one freshly mapped page
    cuMemSetAccess, one page whose access is already set
    cuMemSetAccess, one call over a run of 16 (and of 64) freshly mapped pages
    cuMemUnmap
    cuMemRelease

Printed and saved: p50 and p99 per call (per page too, for runs) and calls per second over all
threads. A driver that serialises a call shows a p50 growing with the thread count and a flat
aggregate rate ("x vs 1 thread" near 1.0).

Then an experiment on access. CUDA's documentation of ``cuMemSetAccess`` asks for "a fully mapped
address range" and says nothing on whether access outlives an unmap, so "set access once over a
reusable range, then only ``cuMemMap``" is only a growth strategy if the driver says so. It is
asked through ``cuMemGetAccess`` after each of: a fresh map; ``cuMemSetAccess``; unmap and map
again at the same address; access set once over a 4-page range, then one page unmapped and
another handle mapped there. On a GPU two child processes then write through a page: one with
access set (the control), one remapped without setting access again (a fault would take down
its CUDA context, hence the child).

    python scripts/bench_vmm.py [--sizes 2MiB,8MiB,32MiB] [--threads 1,2,4,8] [--pages 256]
    python scripts/bench_vmm.py --driver-lib PATH ...   # against another libcuda (tests: a stub)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

import benchlib
import resultpath
from pyvattn.errors import CudaError, PyvattnError
from pyvattn.units import format_size

MiB = 1 << 20
RUNS = (16, 64)  # pages per cuMemSetAccess call in the run phases
RUN_CALLS = 32  # run calls per config at least: map, time the runs, unmap, as often as that takes
OPS = ("cuMemCreate", "cuMemMap", "cuMemSetAccess fresh, 1 page", "cuMemSetAccess again, 1 page",
       *(f"cuMemSetAccess fresh, run of {r}" for r in RUNS), "cuMemUnmap", "cuMemRelease")


# --- the per-thread work ------------------------------------------------------------------------
class Worker:
    """One thread's pages: its reservation, its handles, and the time of every call it made.

    ``run()`` goes through the phases of ``OPS`` in order, waiting on the shared barrier before
    each timed phase; whatever happens, it unmaps, releases and unreserves what it made."""

    def __init__(self, drv: benchlib.VmmDriver, size: int, pages: int, barrier: threading.Barrier):
        self.drv, self.size, self.pages, self.barrier = drv, size, pages, barrier
        self.threads = barrier.parties
        self.ns: dict[str, list[int]] = {op: [] for op in OPS}
        self.wall_s: dict[str, float] = {}
        self.error: BaseException | None = None
        self._base: int | None = None
        self._handles: list[int] = []
        self._mapped: set[int] = set()

    def run(self) -> None:
        try:
            self.drv.bind()
            self._base = self.drv.reserve(self.pages * self.size, self.size & -self.size)
            self._phases()
        except BaseException as exc:  # noqa: BLE001 - reported by the caller, other threads released
            self.error = exc
            self.barrier.abort()
        finally:
            self._clean_up()

    def _va(self, i: int) -> int:
        return self._base + i * self.size

    def _timed(self, op: str, count: int, call, after=None) -> None:
        """``count`` calls ``call(i) -> CUresult``, each timed alone, after the barrier."""
        self.barrier.wait()
        sink, clock = self.ns[op], time.perf_counter_ns
        start = clock()
        for i in range(count):
            t0 = clock()
            status = call(i)
            t1 = clock()
            self.drv.check(op.split()[0], status)
            sink.append(t1 - t0)
            if after is not None:
                after(i)
        self.wall_s[op] = self.wall_s.get(op, 0.0) + (clock() - start) / 1e9

    def _phases(self) -> None:
        lib, drv, S, n = self.drv.lib, self.drv, self.size, self.pages
        out = drv.cuda.ffi.new("CUmemGenericAllocationHandle *")
        prop, access = drv.prop, drv.access
        self._timed("cuMemCreate", n, lambda i: lib.cuMemCreate(out, S, prop, 0),
                    after=lambda i: self._handles.append(int(out[0])))
        self._timed("cuMemMap", n, lambda i: lib.cuMemMap(self._va(i), S, 0, self._handles[i], 0),
                    after=self._mapped.add)
        self._timed("cuMemSetAccess fresh, 1 page", n, lambda i: lib.cuMemSetAccess(self._va(i), S, access, 1))
        self._timed("cuMemSetAccess again, 1 page", n, lambda i: lib.cuMemSetAccess(self._va(i), S, access, 1))
        self._timed("cuMemUnmap", n, lambda i: lib.cuMemUnmap(self._va(i), S), after=self._mapped.discard)
        for run in RUNS:  # access over runs needs fresh mappings: map again (untimed), then time
            for _ in range(-(-RUN_CALLS // (self.threads * (n // run)))):
                self._map_all()
                self._timed(f"cuMemSetAccess fresh, run of {run}", n // run,
                            lambda i, run=run: lib.cuMemSetAccess(self._va(i * run), run * S, access, 1))
                self._unmap_all()
        released: list[int] = []
        try:
            self._timed("cuMemRelease", n, lambda i: lib.cuMemRelease(self._handles[i]),
                        after=lambda i: released.append(self._handles[i]))
        finally:
            self._handles = [h for h in self._handles if h not in set(released)]

    def _map_all(self) -> None:
        for i, h in enumerate(self._handles):
            self.drv.map(self._va(i), self.size, h)
            self._mapped.add(i)

    def _unmap_all(self) -> None:
        for i in sorted(self._mapped):
            self.drv.unmap(self._va(i), self.size)
            self._mapped.discard(i)

    def _clean_up(self) -> None:
        """Best effort after a failure (the failure itself is what gets reported)."""
        lib = self.drv.lib
        for i in sorted(self._mapped):
            lib.cuMemUnmap(self._va(i), self.size)
        for h in self._handles:
            lib.cuMemRelease(h)
        if self._base is not None:
            lib.cuMemAddressFree(self._base, self.pages * self.size)


def measure_config(drv: benchlib.VmmDriver, size: int, threads: int, pages: int) -> dict:
    """All phases at one page size from ``threads`` threads at once; statistics per op."""
    barrier = threading.Barrier(threads)
    workers = [Worker(drv, size, pages, barrier) for _ in range(threads)]
    pool = [threading.Thread(target=w.run, name=f"vmm-{i}") for i, w in enumerate(workers)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    errors = [w.error for w in workers if w.error is not None and not isinstance(w.error, threading.BrokenBarrierError)]
    result = {"page_bytes": size, "threads": threads, "pages_per_thread": pages}
    if errors:
        result["error"] = f"{type(errors[0]).__name__}: {errors[0]}"
        return result
    ops = {}
    for op in OPS:
        samples = [ns / 1e3 for w in workers for ns in w.ns[op]]
        stats = benchlib.summary(samples)
        per_call_pages = int(op.rsplit(" ", 1)[1]) if "run of" in op else 1
        stats["pages_per_call"] = per_call_pages
        stats["p50_per_page"] = stats["p50"] / per_call_pages if stats["p50"] is not None else None
        wall = max(w.wall_s.get(op, 0.0) for w in workers)
        stats["calls_per_s"] = len(samples) / wall if wall > 0 else None
        ops[op] = {k: v for k, v in stats.items() if k != "mean"}
    result["ops_us"] = ops
    return result


def pages_for(size: int, threads: int, pages: int, mem_per_thread: int, free: int) -> int:
    """Pages per thread: ``pages`` at most, ``mem_per_thread`` at most, 64 at least (the longest
    run), a multiple of 64; 0 when even that does not fit in free device memory (1 GiB spare)."""
    n = max(64, min(pages, mem_per_thread // size)) // 64 * 64
    while n > 64 and threads * n * size > free - (1 << 30):
        n -= 64
    return n if threads * n * size <= free - (1 << 30) else 0


def call_floor_us(drv: benchlib.VmmDriver, calls: int = 2000) -> float:
    """Median host time of the cheapest driver call (``cuCtxGetCurrent``): timer + cffi + driver
    entry, the floor under every number in the table."""
    out = drv.cuda.ffi.new("CUcontext *")
    clock, lib, ns = time.perf_counter_ns, drv.lib, []
    for _ in range(calls):
        t0 = clock()
        lib.cuCtxGetCurrent(out)
        ns.append(clock() - t0)
    return benchlib.summary(v / 1e3 for v in ns)["p50"]


# --- does access outlive an unmap? ---------------------------------------------------------------
def _status(fn, *args) -> str:
    """Run one setup step; the driver's status name ("CUDA_SUCCESS" when it worked)."""
    try:
        fn(*args)
    except CudaError as exc:
        return exc.status
    return "CUDA_SUCCESS"


def _flags(drv: benchlib.VmmDriver, va: int) -> int | str:
    """Access flags at ``va`` (0 none, 3 read/write), or the status name the query failed with."""
    try:
        return drv.get_access(va)
    except CudaError as exc:
        return exc.status


def probe_access(drv: benchlib.VmmDriver) -> dict:
    """Ask the driver what happens to access across unmap and map again (see the module doc)."""
    S = drv.granularity
    base = drv.reserve(4 * S, S)
    handles = [drv.create(S) for _ in range(5)]
    mapped: set[int] = set()

    def map_(i: int, h: int) -> None:
        drv.map(base + i * S, S, h)
        mapped.add(i)

    def unmap(i: int) -> None:
        drv.unmap(base + i * S, S)
        mapped.discard(i)

    r: dict = {}
    try:
        r["get_access_on_a_reserved_unmapped_page"] = _flags(drv, base + 3 * S)
        map_(0, handles[0])
        map_(2, handles[1])
        r["set_access_over_a_range_with_an_unmapped_page"] = _status(drv.set_access, base, 3 * S)
        r["flags_after_a_fresh_map"] = _flags(drv, base)
        drv.set_access(base, S)
        r["flags_after_set_access"] = _flags(drv, base)
        unmap(0)
        map_(0, handles[2])
        r["flags_after_unmap_and_map_again"] = _flags(drv, base)
        map_(1, handles[3])
        map_(3, handles[4])
        drv.set_access(base, 4 * S)  # once over the whole range
        unmap(1)
        map_(1, handles[0])  # unmapped since the first remap
        r["flags_of_a_page_mapped_into_a_range_whose_access_was_set_once"] = _flags(drv, base + S)
        r["flags_of_its_neighbour_left_mapped"] = _flags(drv, base + 2 * S)
    finally:
        for i in sorted(mapped):
            drv.lib.cuMemUnmap(base + i * S, S)
        for h in handles:
            drv.lib.cuMemRelease(h)
        drv.lib.cuMemAddressFree(base, 4 * S)
    rw = drv.cuda.CU_MEM_ACCESS_FLAGS_PROT_READWRITE
    survives = (r["flags_after_unmap_and_map_again"] == rw
                and r["flags_of_a_page_mapped_into_a_range_whose_access_was_set_once"] == rw)
    r["access_survives_unmap"] = survives
    r["reading"] = ("the driver reports access on pages mapped again without cuMemSetAccess: "
                    "'access once, then cuMemMap only' is worth timing (bench_growth.py map-only)"
                    if survives else
                    "access belongs to a mapping: a page mapped again has no access until "
                    "cuMemSetAccess, so every growth pays it (bench_growth.py map-only is a floor, "
                    "not a strategy)")
    return r


def touch_child(mode: str, ordinal: int) -> dict:
    """In a child process: map a page (``mode="set-access"``: with access set; ``"remap-without-
    access"``: access set, unmapped, another page mapped there with no new cuMemSetAccess), write
    it from the GPU and read it back."""
    from pyvattn._ffi.dlpack import device_tensor

    torch.cuda.init()
    drv = benchlib.VmmDriver(ordinal)
    S = drv.granularity
    va = drv.reserve(S, S)
    first, second = drv.create(S), drv.create(S)
    drv.map(va, S, first)
    drv.set_access(va, S)
    if mode == "remap-without-access":
        drv.unmap(va, S)
        drv.map(va, S, second)
    try:
        t = device_tensor(va, S, torch.device("cuda", ordinal))
        t.fill_(7)
        torch.cuda.synchronize()
        ok = int(t[:4096].sum().item()) == 7 * 4096
        return {"outcome": "ok" if ok else "wrong values"}
    except Exception as exc:  # the fault we are looking for, if the driver gives one
        return {"outcome": "error", "error": str(exc).strip().splitlines()[0][:300]}


def run_touch_children(ordinal: int, timeout_s: float) -> dict:
    out = {}
    for mode in ("set-access", "remap-without-access"):
        cmd = [sys.executable, str(Path(__file__).resolve()), "--touch-child", mode, "--device", f"cuda:{ordinal}"]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
            lines = [ln for ln in done.stdout.splitlines() if ln.startswith("{")]
            out[mode] = json.loads(lines[-1]) if lines else {
                "outcome": f"crashed (exit {done.returncode})", "error": done.stderr.strip()[-300:]}
        except subprocess.TimeoutExpired:
            out[mode] = {"outcome": f"hung (killed after {timeout_s:.0f} s)"}
    return out


# --- report -------------------------------------------------------------------------------------
def render(result: dict) -> str:
    lines = []
    for size in sorted({c["page_bytes"] for c in result["configs"]}):
        configs = [c for c in result["configs"] if c["page_bytes"] == size]
        head = ["call (host µs per call)"] + [f"{c['threads']} thr p50 / p99" for c in configs]
        rows = []
        for op in OPS:
            row = [op]
            for c in configs:
                s = c.get("ops_us", {}).get(op)
                cell = f"{s['p50']:.1f} / {s['p99']:.1f}" if s and s["n"] else c.get("error", "-")[:40]
                if s and s["n"] and s["pages_per_call"] > 1:
                    cell += f" ({s['p50_per_page']:.1f}/page)"
                row.append(cell)
            rows.append(row)
        base = configs[0].get("ops_us")
        for op in OPS:
            if base is None or len(configs) < 2:
                break
            rates = [c.get("ops_us", {}).get(op, {}).get("calls_per_s") for c in configs]
            if rates[0]:
                rows.append([f"  {op}: calls/s vs 1 thread"] + [f"{r / rates[0]:.2f}x" if r else "-" for r in rates])
        lines += [f"\n{format_size(size)} pages (pages per thread: "
                  f"{', '.join(str(c.get('pages_per_thread')) for c in configs)})", benchlib.table(head, rows)]
    lines.append(f"\nfloor (cuCtxGetCurrent through cffi, timer included): {result['call_floor_us']:.2f} µs")
    acc = result.get("access_probe")
    if acc:
        lines.append("\ndoes access outlive an unmap? (cuMemGetAccess: 3 = read/write, 0 = none)")
        lines += [f"  {k}: {v}" for k, v in acc.items() if k != "reading"]
        lines.append(f"  => {acc['reading']}")
    return "\n".join(lines)


def plot(result: dict, path: Path) -> Path | None:
    """p50 per page against threads, one panel per page size."""
    plt = benchlib.pyplot()
    if plt is None:
        return None
    sizes = sorted({c["page_bytes"] for c in result["configs"]})
    fig, axes = plt.subplots(1, len(sizes), figsize=(5 * len(sizes), 4), squeeze=False)
    for ax, size in zip(axes[0], sizes):
        configs = [c for c in result["configs"] if c["page_bytes"] == size and "ops_us" in c]
        for op in OPS:
            pts = [(c["threads"], c["ops_us"][op]["p50_per_page"]) for c in configs if c["ops_us"][op]["n"]]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=op)
        ax.set(title=f"{format_size(size)} pages", xlabel="threads at once", yscale="log",
               ylabel="p50 µs per page (a run: per call / pages)", xticks=[c["threads"] for c in configs])
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    title = f"CUDA VMM calls on {result['machine'].get('gpu') or result.get('device_name')}"
    return benchlib.save_figure(plt, fig, title, path)


# --- main ---------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", type=benchlib.cuda_device, default="cuda", help="a CUDA device (cuda, cuda:1)")
    ap.add_argument("--sizes", type=benchlib.csv_sizes, default="2MiB,8MiB,32MiB",
                    help="page sizes, multiples of the device's granularity (default: 2MiB,8MiB,32MiB)")
    ap.add_argument("--threads", type=benchlib.csv_ints, default="1,2,4,8", help="thread counts (default: 1,2,4,8)")
    ap.add_argument("--pages", type=benchlib.positive_int, default=256,
                    help="pages per thread at most (default 256; at least 64)")
    ap.add_argument("--mem-per-thread", type=benchlib.size_arg, default="2GiB",
                    help="device memory per thread at most (default 2GiB)")
    ap.add_argument("--time-budget", type=float, default=20.0,
                    help="seconds for the latency table; configurations not started by then are skipped")
    ap.add_argument("--no-access-probe", action="store_true", help="skip the access experiment")
    ap.add_argument("--driver-lib", default=None, help="load this libcuda instead of the system's (tests: a stub)")
    resultpath.add_output_arguments(ap, "bench_vmm")
    ap.add_argument("--no-plot", action="store_true")
    ap.add_argument("--touch-child", choices=["set-access", "remap-without-access"], help=argparse.SUPPRESS)
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    device = args.device
    if args.pages < 64:
        print(f"bench_vmm.py: --pages {args.pages} must be at least 64 (the longest run)", file=sys.stderr)
        return 2
    ordinal = device.index or 0
    if args.touch_child:
        print(json.dumps(touch_child(args.touch_child, ordinal)), flush=True)
        os._exit(0)  # no teardown in a context a fault may have poisoned
    try:
        if args.driver_lib:
            from pyvattn._ffi import cuda

            cuda.use_library(args.driver_lib)
        drv = benchlib.VmmDriver(ordinal)
    except PyvattnError as exc:
        print(f"bench_vmm.py: no CUDA driver to measure: {exc}", file=sys.stderr)
        return 2
    bad = [s for s in args.sizes if s % drv.granularity]
    if bad:
        print(f"bench_vmm.py: --sizes {bad} are not multiples of the granularity {drv.granularity}", file=sys.stderr)
        drv.close()
        return 2
    gpu_here = torch.cuda.is_available() and args.driver_lib is None
    result = {"machine": benchlib.machine_facts(device if gpu_here else "cpu"), "device_name": drv.device_name,
              "driver_lib": args.driver_lib, "granularity": drv.granularity,
              "args": {k: v for k, v in vars(args).items() if k != "touch_child"}, "configs": []}
    try:
        result["call_floor_us"] = call_floor_us(drv)
        total = len(args.sizes) * len(args.threads)
        t_start = time.perf_counter()
        for size in args.sizes:
            for threads in args.threads:
                n = pages_for(size, threads, args.pages, args.mem_per_thread, drv.free_memory())
                label = f"[{len(result['configs']) + 1}/{total}] {format_size(size)} x {threads} threads"
                if time.perf_counter() - t_start > args.time_budget:
                    result["configs"].append({"page_bytes": size, "threads": threads, "pages_per_thread": 0,
                                              "error": f"skipped: out of time (--time-budget {args.time_budget:g} s)"})
                    print(f"{label}: skipped, out of time", flush=True)
                    continue
                if n == 0:
                    result["configs"].append({"page_bytes": size, "threads": threads, "pages_per_thread": 0,
                                              "error": "skipped: not enough free device memory"})
                    print(f"{label}: skipped, not enough free device memory", flush=True)
                    continue
                t0 = time.perf_counter()
                result["configs"].append(measure_config(drv, size, threads, n))
                print(f"{label}: {n} pages per thread, {time.perf_counter() - t0:.1f} s", flush=True)
        if not args.no_access_probe:
            result["access_probe"] = probe_access(drv)
            result["access_probe_touch"] = (run_touch_children(ordinal, 20) if gpu_here
                                            else "skipped: no GPU (the write would need one)")
    finally:
        drv.close()
    print(render(result))
    if isinstance(result.get("access_probe_touch"), dict):
        for mode, r in result["access_probe_touch"].items():
            print(f"  GPU write after {mode}: {r}")
    out = Path(args.out)
    benchlib.save_json(out, result)
    if not args.no_plot and plot(result, out.with_suffix(".png")):
        print(f"saved {out.with_suffix('.png')}")
    failed = [c for c in result["configs"] if "error" in c and not c["error"].startswith("skipped")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

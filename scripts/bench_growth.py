#!/usr/bin/env python3
"""Growth of one request by one page in every layer on cuda-vmm: what could get it under 1 ms.

One request growing by one 2 MiB page in a 32-layer model maps 64 pages (each layer's K and V is
its own region, far apart in VA), one cuMemMap and one cuMemSetAccess each: ~2.1 ms on an H100
(benchmarks/results/bench_cuda.json), against a goal of 1 ms. Candidate strategies, each timed in
the same run, interleaved round by round, every growth on fresh addresses (as real growth is):

* ``backend``: pyvattn's ``CudaVmmBackend.map`` today (all maps, then access per region run);
* ``driver``: the same driver calls without pyvattn's bookkeeping (the floor for that order);
* ``interleaved``: map then access, region by region;
* ``threads-T``: the regions split over T persistent threads (does the driver run them at once?);
* ``unit-K``: handles of K x 2 MiB, one map and one access per region per growth: a growth then
  covers K pages' worth of tokens (time per 2 MiB shown), at the price of up to K x 2 MiB per
  region a request may hold unused;
* ``prewarmed``: addresses mapped and unmapped once before (page tables already built);
* ``map-only``: cuMemMap without cuMemSetAccess. Not usable (the memory is not accessible, see
  bench_vmm.py's access experiment): it is the floor "set access once" would give if access
  survived an unmap.

Goal printed: under 1 ms per one-page growth of all layers. Saves JSON (default
benchmarks/results/bench_growth.json).

    python scripts/bench_growth.py [--layers 32] [--repeat 20] [--threads 2,4,8] [--units 2,4]
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch

import benchlib
import resultpath
from pyvattn.errors import PyvattnError

GOAL_MS = 1.0


class ThreadPool:
    """T persistent threads, each with the context current, running one job chunk each per call:
    what a backend that maps from several threads would keep (no thread start per growth)."""

    def __init__(self, drv: benchlib.VmmDriver, threads: int):
        self.drv, self.threads = drv, threads
        self._start = threading.Barrier(threads + 1)
        self._done = threading.Barrier(threads + 1)
        self._job = None
        self._errors: list[BaseException] = []
        self._stop = False
        self._pool = [threading.Thread(target=self._loop, args=(i,), daemon=True) for i in range(threads)]
        for t in self._pool:
            t.start()

    def _loop(self, index: int) -> None:
        self.drv.bind()
        while True:
            try:
                self._start.wait()
            except threading.BrokenBarrierError:
                return
            if self._stop:
                return
            try:
                self._job(index)
            except BaseException as exc:  # noqa: BLE001 - re-raised by run()
                self._errors.append(exc)
            try:
                self._done.wait()
            except threading.BrokenBarrierError:
                return

    def run(self, job) -> None:
        """``job(i)`` on thread i, for every i, all at once; returns when all are done."""
        self._job = job
        self._start.wait()
        self._done.wait()
        if self._errors:
            raise self._errors.pop(0)

    def close(self) -> None:
        self._stop = True
        self._start.abort()
        for t in self._pool:
            t.join(timeout=5)


class Growth:
    """One strategy: ``regions`` regions of ``positions`` slots of ``unit`` bytes in one
    reservation, ``regions`` handles of ``unit`` bytes; ``grow(p)`` maps slot ``p`` of every region
    (timed), ``shrink()`` unmaps them again (untimed)."""

    def __init__(self, name: str, drv: benchlib.VmmDriver, regions: int, positions: int, unit: int,
                 access: bool = True, threads: int = 1, interleave: bool = False, reuse_position: bool = False):
        self.name, self.drv, self.regions, self.positions, self.unit = name, drv, regions, positions, unit
        self.access, self.interleave, self.reuse_position = access, interleave, reuse_position
        self.pool = ThreadPool(drv, threads) if threads > 1 else None
        self.threads = threads
        self.ms: list[float] = []
        self._base = drv.reserve(regions * positions * unit, unit & -unit)  # aligned to the unit
        self._handles: list[int] = []
        self._mapped: list[int] = []
        try:
            self._handles = [drv.create(unit) for _ in range(regions)]
        except BaseException:
            self.close()
            raise

    def vas(self, position: int) -> list[int]:
        p = 0 if self.reuse_position else position
        return [self._base + (r * self.positions + p) * self.unit for r in range(self.regions)]

    def _map_range(self, vas: list[int], handles: list[int]) -> None:
        lib, U, acc = self.drv.lib, self.unit, self.drv.access
        check = self.drv.check
        if self.interleave:
            for va, h in zip(vas, handles):
                check("cuMemMap", lib.cuMemMap(va, U, 0, h, 0))
                check("cuMemSetAccess", lib.cuMemSetAccess(va, U, acc, 1))
            return
        for va, h in zip(vas, handles):
            check("cuMemMap", lib.cuMemMap(va, U, 0, h, 0))
        if self.access:
            for va in vas:
                check("cuMemSetAccess", lib.cuMemSetAccess(va, U, acc, 1))

    def grow(self, position: int) -> float:
        vas = self.vas(position)
        t0 = time.perf_counter()
        try:
            if self.pool is None:
                self._map_range(vas, self._handles)
            else:
                chunks = np.array_split(np.arange(self.regions), self.threads)
                self.pool.run(lambda i: self._map_range([vas[j] for j in chunks[i]],
                                                        [self._handles[j] for j in chunks[i]]))
        except BaseException:
            self._mapped = [va for va in vas if self._is_mapped(va)]  # for close() to unmap
            raise
        elapsed = (time.perf_counter() - t0) * 1e3
        self._mapped = vas
        return elapsed

    def _is_mapped(self, va: int) -> bool:
        """Whether ``va`` holds a mapping (after a failure part-way: the driver knows)."""
        try:
            self.drv.get_access(va)
            return True
        except PyvattnError:
            return False

    def shrink(self) -> None:
        self.drv.synchronize()
        for va in self._mapped:
            self.drv.unmap(va, self.unit)
        self._mapped = []

    def close(self) -> None:
        if self.pool is not None:
            self.pool.close()
        for va in self._mapped:
            self.drv.lib.cuMemUnmap(va, self.unit)
        for h in self._handles:
            self.drv.lib.cuMemRelease(h)
        self.drv.lib.cuMemAddressFree(self._base, self.regions * self.positions * self.unit)


class BackendGrowth:
    """The same growth through pyvattn's own ``CudaVmmBackend.map`` (the product path today)."""

    def __init__(self, device: torch.device, regions: int, positions: int):
        from pyvattn.backends.cuda_vmm import CudaVmmBackend

        self.name, self.unit, self.threads = "backend", CudaVmmBackend.granularity(device), 1
        self.regions, self.positions = regions, positions
        self.be = CudaVmmBackend(device, self.unit)
        self.ms: list[float] = []
        self._nbytes = regions * positions * self.unit
        self._base = self.be.reserve(self._nbytes)
        self._handles = self.be.create_pages(regions)
        self._mapped: list[int] = []

    def grow(self, position: int) -> float:
        vas = [self._base + (r * self.positions + position) * self.unit for r in range(self.regions)]
        t0 = time.perf_counter()
        self.be.map(vas, self._handles)
        elapsed = (time.perf_counter() - t0) * 1e3
        self._mapped = vas
        return elapsed

    def shrink(self) -> None:
        self.be.unmap(self._mapped)
        self._mapped = []

    def close(self) -> None:
        self.be.close()


def build_strategies(args, device: torch.device, drv: benchlib.VmmDriver, positions: int) -> list:
    R, G = 2 * args.layers, drv.granularity
    made = [BackendGrowth(device, R, positions)]
    specs = [("driver", {}), ("interleaved", {"interleave": True}), ("prewarmed", {"reuse_position": True})]
    specs += [(f"threads-{t}", {"threads": t}) for t in args.threads]
    specs += [(f"unit-{k}", {"unit": k * G}) for k in args.units]
    specs += [("map-only", {"access": False})]
    try:
        for name, kw in specs:
            kw.setdefault("unit", G)
            made.append(Growth(name, drv, R, positions, **kw))
    except BaseException:
        for s in made:
            s.close()
        raise
    return made


def run(args, device: torch.device, drv: benchlib.VmmDriver) -> dict:
    rounds = args.warmup + args.repeat
    strategies = build_strategies(args, device, drv, positions=rounds)
    try:
        for s in strategies:
            if s.name == "prewarmed":  # build the page tables under its one position once
                s.grow(0)
                s.shrink()
        for rnd in range(rounds):
            for s in strategies:  # interleaved: drift over the run falls on all alike
                ms = s.grow(rnd)
                s.shrink()
                if rnd >= args.warmup:
                    s.ms.append(ms)
    finally:
        for s in strategies:
            s.close()
    R, G = 2 * args.layers, drv.granularity
    base = float(np.median(strategies[0].ms))
    rows = {}
    for s in strategies:
        st = benchlib.summary(s.ms)
        pages = s.unit // G
        rows[s.name] = {**st, "unit_bytes": s.unit, "threads": s.threads,
                        "per_2MiB_page_of_growth_ms": st["p50"] / pages,
                        "per_mapped_2MiB_us": st["p50"] * 1e3 / (R * pages),
                        "vs_backend": st["p50"] / base, "usable": s.name != "map-only",
                        "goal_met": st["p50"] / pages < GOAL_MS and s.name != "map-only"}
    return {"layers": args.layers, "regions": R, "granularity": G, "goal_ms": GOAL_MS, "strategies": rows}


def render(r: dict) -> str:
    head = ["strategy", "p50 ms", "p99 ms", "max ms", "ms per page of growth", "µs per 2 MiB mapped",
            "vs backend", f"< {r['goal_ms']:g} ms"]
    rows = []
    for name, s in r["strategies"].items():
        goal = ("yes" if s["goal_met"] else "no") if s["usable"] else "n/a (floor)"
        rows.append([name, f"{s['p50']:.3f}", f"{s['p99']:.3f}", f"{s['max']:.3f}",
                     f"{s['per_2MiB_page_of_growth_ms']:.3f}", f"{s['per_mapped_2MiB_us']:.1f}",
                     f"{s['vs_backend']:.2f}x", goal])
    return (f"\ngrow one request by one page in all {r['layers']} layers ({r['regions']} regions), "
            f"interleaved rounds\n" + benchlib.table(head, rows))


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", type=benchlib.cuda_device, default="cuda")
    ap.add_argument("--layers", type=benchlib.positive_int, default=32)
    ap.add_argument("--repeat", type=benchlib.positive_int, default=40, help="timed growths per strategy")
    ap.add_argument("--warmup", type=benchlib.nonnegative_int, default=2)
    ap.add_argument("--threads", type=benchlib.csv_ints, default="2,4,8", help="thread counts to try")
    ap.add_argument("--units", type=benchlib.csv_ints, default="2,4", help="mapping units, in granules, to try")
    ap.add_argument("--driver-lib", default=None, help="load this libcuda instead of the system's (tests: a stub)")
    resultpath.add_output_arguments(ap, "bench_growth")
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    device = args.device
    try:
        if args.driver_lib:
            from pyvattn._ffi import cuda

            cuda.use_library(args.driver_lib)
        drv = benchlib.VmmDriver(device.index or 0)
    except PyvattnError as exc:
        print(f"bench_growth.py: no CUDA driver to measure: {exc}", file=sys.stderr)
        return 2
    gpu_here = torch.cuda.is_available() and args.driver_lib is None
    try:
        result = {"machine": benchlib.machine_facts(device if gpu_here else "cpu"), "device_name": drv.device_name,
                  "driver_lib": args.driver_lib, "args": {k: str(v) for k, v in vars(args).items()},
                  **run(args, device, drv)}
    finally:
        drv.close()
    print(render(result))
    out = Path(args.out)
    benchlib.save_json(out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())

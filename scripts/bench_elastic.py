#!/usr/bin/env python3
"""Sleep and wake of a KV cache holding tens of GiB, at each backend's page size (issue 15).

A Llama-3-8B-shaped cache (32 layers, 8 KV heads x 128, fp16: 128 KiB per token over all layers'
K and V) is filled to ``--size`` bytes by requests that then finish (their pages stay mapped:
retained, as after a generation phase). Timed, each ``--repeat`` times:

* ``sleep``: ``cache.sleep()``: unmap every page and release it to the OS / device;
* ``wake``: ``cache.wake()`` (with nothing kept: the cache maps on demand again);
* ``refill``: the first steps after waking that map the whole ``--size`` again (what a serving
  loop pays to be back where it was; creation of the pages included);
* ``sleep_keep`` / ``wake_keep``: ``sleep(keep=True)`` and ``wake()`` with ``--keep`` running
  requests (512 MiB of KV each at 32 layers) copied to host memory (pinned on a GPU) and back.

Backends: host always (what fits this machine: ``--host-size``, default 8 GiB, stands in for the
40 GiB class); cuda-vmm and uvm64k where they are available, at ``--size`` (default 40 GiB); a
backend that is not is listed with the reason. Goal on a GPU for cuda-vmm: sleep and wake (to
usable) both under 100 ms.

    python scripts/bench_elastic.py [--size 40GiB] [--host-size 8GiB] [--keep 2]
                                    [--repeat 3] [--layers 32] [--backends host,cuda-vmm,uvm64k]
                                    [--save | --out PATH]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
from tqdm import tqdm

import benchlib
import resultpath
from pyvattn import KVCache, backends
from pyvattn.units import parse_size

GOAL_MS = 100.0
HEADS, HEAD_DIM, SEQ = 8, 128, 4096
# (backend, device, page sizes): host at its default and at cuda-vmm's 2 MiB, for comparison
PLANS = {"host": ("cpu", ["64KiB", "2MiB"]), "cuda-vmm": ("cuda", ["2MiB"]), "uvm64k": ("cuda", ["64KiB"])}


def size_arg(value: str) -> int:
    try:
        size = parse_size(value, "size")
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if size <= 0:
        raise argparse.ArgumentTypeError(f"{value!r} must be a positive size")
    return size


def request_bytes(layers: int) -> int:
    """KV of one ``SEQ``-token request: K and V of every layer, fp16."""
    return SEQ * 2 * layers * HEADS * HEAD_DIM * 2


def cache_for(name: str, device: str, page_size: str, nbytes: int, layers: int) -> tuple[KVCache, int]:
    """A cache with room for ``nbytes`` of KV in requests of ``SEQ`` tokens; and how many."""
    requests = nbytes // request_bytes(layers)
    cache = KVCache(layers, HEADS, HEAD_DIM, requests, SEQ, torch.float16, device=device,
                    page_size=page_size, backend=name)
    return cache, requests


def fill(cache: KVCache, requests: int, keep_running: int = 0) -> float:
    """Map ``requests`` full requests (milliseconds); all but ``keep_running`` finish."""
    slots = [cache.alloc_slot() for _ in range(requests)]
    t0 = time.perf_counter()
    cache.step({s: SEQ for s in slots})
    cache.backend.synchronize()
    ms = (time.perf_counter() - t0) * 1e3
    for s in slots[keep_running:]:
        cache.free_slot(s)
    return ms


def timed(fn, sync) -> float:
    t0 = time.perf_counter()
    fn()
    sync()
    return (time.perf_counter() - t0) * 1e3


def bench_one(name: str, device: str, page_size: str, nbytes: int, keep: int, repeat: int, layers: int) -> dict:
    cache, requests = cache_for(name, device, page_size, nbytes, layers)
    sync = cache.backend.synchronize
    times: dict[str, list[float]] = {k: [] for k in ("sleep", "wake", "refill", "sleep_keep", "wake_keep")}
    try:
        first = fill(cache, requests)
        held = cache.stats()["physical_bytes"]
        for _ in tqdm(range(repeat), desc=f"{name} {page_size} {held / 2**30:.1f} GiB", unit="round", file=sys.stdout):
            times["sleep"].append(timed(cache.sleep, sync))
            assert cache.stats()["physical_bytes"] == 0
            times["wake"].append(timed(cache.wake, sync))
            times["refill"].append(fill(cache, requests))
        cache.trim()
        kept = min(keep, requests)
        fill(cache, kept, keep_running=kept)
        for _ in range(repeat):
            times["sleep_keep"].append(timed(lambda: cache.sleep(keep=True), sync))
            times["wake_keep"].append(timed(cache.wake, sync))
    finally:
        cache.close()
    return {"backend": name, "page_size": page_size, "bytes": held, "requests": requests,
            "layers": layers, "kept_bytes": kept * request_bytes(layers), "first_fill_ms": first,
            **{f"{k}_ms": benchlib.summary(v) for k, v in times.items()}}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=size_arg, default=parse_size("40GiB", "size"),
                   help="KV memory a GPU cache holds (default 40GiB)")
    p.add_argument("--host-size", type=size_arg, default=parse_size("8GiB", "size"),
                   help="KV memory the host cache holds (default 8GiB: what fits a 24 GiB machine)")
    p.add_argument("--keep", type=benchlib.positive_int, default=2,
                   help="running requests (512 MiB of KV each) that sleep(keep=True) copies out (default 2)")
    p.add_argument("--repeat", type=benchlib.positive_int, default=3)
    p.add_argument("--layers", type=benchlib.positive_int, default=32, help="model layers (default 32)")
    p.add_argument("--backends", default="host,cuda-vmm,uvm64k",
                   help="comma-separated, of: " + ", ".join(PLANS))
    resultpath.add_output_arguments(p, "bench_elastic")
    args = p.parse_args(argv)
    wanted = [b.strip() for b in args.backends.split(",") if b.strip()]
    unknown = [b for b in wanted if b not in PLANS]
    if unknown or not wanted:
        p.error(f"--backends: {unknown or 'none given'}: choose from {', '.join(PLANS)}")
    for flag, size in (("--size", args.size), ("--host-size", args.host_size)):
        if size < request_bytes(args.layers):
            p.error(f"{flag}: less than one {SEQ}-token request of {args.layers} layers "
                    f"({request_bytes(args.layers)} bytes)")

    rows, skipped = [], []
    for name in wanted:
        device, page_sizes = PLANS[name]
        if device == "cuda" and not torch.cuda.is_available():
            skipped.append({"backend": name, "reason": "no CUDA device visible to torch"})
            continue
        probe = backends.probe(name, torch.device(device))
        if not probe.available:
            skipped.append({"backend": name, "reason": probe.reason})
            continue
        size = args.host_size if name == "host" else args.size
        for page_size in page_sizes:
            rows.append(bench_one(name, device, page_size, size, args.keep, args.repeat, args.layers))

    print(benchlib.table(
        ["backend", "page", "GiB", "sleep ms", "wake ms", "refill ms", "keep GiB", "sleep(keep) ms", "wake(keep) ms"],
        [[r["backend"], r["page_size"], f"{r['bytes'] / 2**30:.1f}", f"{r['sleep_ms']['p50']:.1f}",
          f"{r['wake_ms']['p50']:.3f}", f"{r['refill_ms']['p50']:.0f}", f"{r['kept_bytes'] / 2**30:.1f}",
          f"{r['sleep_keep_ms']['p50']:.0f}", f"{r['wake_keep_ms']['p50']:.0f}"] for r in rows]))
    for s in skipped:
        print(f"skipped {s['backend']}: {s['reason']}")
    for r in rows:
        if r["backend"] == "cuda-vmm":
            ok = r["sleep_ms"]["p50"] < GOAL_MS and r["wake_ms"]["p50"] < GOAL_MS
            print(f"goal (cuda-vmm sleep and wake under {GOAL_MS:.0f} ms): {'met' if ok else 'NOT met'}")
    facts = benchlib.machine_facts("cuda" if torch.cuda.is_available() else None)
    facts["cpus"], facts["load_average_1m"] = os.cpu_count(), os.getloadavg()[0]  # shared machines: context
    benchlib.save_json(args.out, {"machine": facts, "goal_ms": GOAL_MS, "results": rows, "skipped": skipped})
    return 0


if __name__ == "__main__":
    sys.exit(main())

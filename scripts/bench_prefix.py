#!/usr/bin/env python3
"""Prefix sharing (issue 14): what a fork and a prefix hit cost, against copying the prefix.

For each prefix length, a source request holds that many tokens; a second request that needs the
same prefix gets it in one of three ways, each timed and its new physical memory counted:

* ``fork``: ``cache.fork(src, n)``: every whole page of the prefix mapped under the new slot (no
  copy), only the partial last page copied;
* ``hit``: ``alloc_slot(tokens=prompt)`` finding the prefix in a finished request's slot: taken
  over in place, nothing mapped;
* ``copy``: what a cache without sharing does at best (short of recomputing the prefill): step a
  fresh slot to ``n`` tokens and copy every layer's K and V.

    python scripts/bench_prefix.py [--device cpu] [--layers 8] [--prefix 1000,4000,16000] [--repeat 5]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchlib  # noqa: E402
import resultpath  # noqa: E402
from pyvattn import KVCache  # noqa: E402


def in_use(cache) -> int:
    return (cache.pool.total_pages - cache.pool.free_pages) * cache.page_size


def measure(args, n: int) -> dict:
    clock = benchlib.Clock(args.device)
    cache = KVCache(args.layers, 8, 128, 3, n + 64, torch.float16, device=args.device, page_size=args.page_size)
    prompt = np.arange(n + 1)
    out = {"fork": [], "hit": [], "copy": []}
    mem = {}
    try:
        src = cache.alloc_slot(tokens=prompt)
        cache.step({src: n + 1})
        for layer in range(cache.num_layers):
            cache.k[layer][src, :n + 1] = torch.randn(n + 1, 8, 128).to(cache.dtype)
            cache.v[layer][src, :n + 1] = cache.k[layer][src, :n + 1]
        for _ in range(args.repeat):
            before = in_use(cache)
            t = clock.start()
            dst = cache.fork(src, n)
            out["fork"].append(clock.stop(t))
            mem["fork"] = in_use(cache) - before
            cache.free_slot(dst)
            cache.trim()

            before = in_use(cache)
            t = clock.start()
            dst = cache.alloc_slot()
            cache.step({dst: n})
            for layer in range(cache.num_layers):
                cache.k[layer][dst, :n] = cache.k[layer][src, :n]
                cache.v[layer][dst, :n] = cache.v[layer][src, :n]
            out["copy"].append(clock.stop(t))
            mem["copy"] = in_use(cache) - before
            cache.free_slot(dst)
            cache.trim()

            cache.free_slot(src)  # finished, its pages retained: the next prompt takes them over
            before = in_use(cache)
            t = clock.start()
            src = cache.alloc_slot(tokens=prompt)
            out["hit"].append(clock.stop(t))
            mem["hit"] = in_use(cache) - before
            assert cache.cached_tokens(src) >= n - cache.page_size // cache.token_bytes
            cache.step({src: n + 1})
        stats = cache.stats()
    finally:
        cache.close()
    return {"prefix_tokens": n, "page_size": cache.page_size, "backend": cache.selection.name,
            "ms": {k: benchlib.summary(v) for k, v in out.items()}, "new_bytes": mem,
            "prefix_hits": stats["prefix_hits"], "forks": stats["forks"]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", type=benchlib.device_arg, default=torch.device("cpu"))
    ap.add_argument("--layers", type=benchlib.positive_int, default=8)
    ap.add_argument("--prefix", type=benchlib.csv_ints, default=[1000, 4000, 16000],
                    help="prefix lengths in tokens (8 KV heads x 128, fp16: 2 KiB per token per layer's K or V)")
    ap.add_argument("--repeat", type=benchlib.positive_int, default=5)
    ap.add_argument("--page-size", type=lambda v: v if v == "auto" else benchlib.size_arg(v), default="auto",
                    help="auto, or a size (64KiB, 2MiB)")
    resultpath.add_output_arguments(ap, "bench_prefix")
    args = ap.parse_args(argv)
    try:
        runs = [measure(args, n) for n in tqdm(args.prefix, desc="prefix lengths")]
    except ValueError as exc:  # the cache names the argument (a page size the backend cannot map...)
        ap.error(str(exc))
    rows = [(r["prefix_tokens"], *(f"{r['ms'][k]['p50']:.3f}" for k in ("fork", "hit", "copy")),
             *(f"{r['new_bytes'][k] / 2**20:.1f}" for k in ("fork", "hit", "copy"))) for r in runs]
    print(benchlib.table(["prefix tokens", "fork ms", "hit ms", "copy ms", "fork MiB new", "hit MiB new",
                          "copy MiB new"], rows))
    benchlib.save_json(args.out, {"machine": benchlib.machine_facts(args.device), "layers": args.layers,
                                  "repeat": args.repeat, "runs": runs})
    return 0


if __name__ == "__main__":
    sys.exit(main())

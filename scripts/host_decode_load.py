#!/usr/bin/env python3
"""Decode under real load on the host backend: how many memory mappings the cache needs.

Issue 11's target: 32 layers, batch 128, 4 KiB pages of 32 tokens, every request decoded one token
at a time to 4096 tokens: a million page maps. Each step writes the new token of every request in
every layer's K and V; at the end every token is read back. The process's mapping count
(``/proc/self/maps`` lines) is sampled at every step that mapped pages: it must grow with slots x
regions (a slab's pages merge into one mapping), not with pages, and stay far under
``vm.max_map_count``. Before issue 11 each page was a mapping of its own: 32 layers x batch 64
died at length 449 with ENOMEM.

Needs layers x 2 x batch x tokens x 128 B of memory (4 GiB at the defaults). Prints a table, saves
JSON and a plot (default benchmarks/results/host_decode_load.{json,png}).

    python scripts/host_decode_load.py [--layers 32] [--batch 128] [--tokens 4096]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

import resultpath
from pyvattn import KVCache
from pyvattn._ffi import libc

TOKENS_PER_PAGE = 32  # 4 KiB pages of 1 KV head x 64 x fp16 = 128 B per token


def token_values(n: int, batch: int, layer: int, kind: int) -> torch.Tensor:
    """A value per request for token ``n`` of ``layer``'s K (kind 0) or V (1), exact in fp16."""
    return ((n * 7 + torch.arange(batch) * 3 + layer * 5 + kind) % 2039).to(torch.float16)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--tokens", type=int, default=4096)
    resultpath.add_output_arguments(ap, "host_decode_load")
    args = ap.parse_args(argv)
    for name in ("layers", "batch", "tokens"):
        if getattr(args, name) < 1:
            ap.error(f"--{name} must be >= 1")

    limit, start = libc.max_map_count(), libc.map_count()
    regions = 2 * args.layers
    cache = KVCache(args.layers, 1, 64, args.batch, args.tokens, torch.float16, device="cpu", page_size=4096)
    samples = []  # (tokens decoded, mappings of this process)
    t0 = time.perf_counter()
    try:
        slots = [cache.alloc_slot() for _ in range(args.batch)]
        assert slots == list(range(args.batch))
        for n in tqdm(range(1, args.tokens + 1), desc="decode", unit="token"):
            cache.step({s: n for s in slots})
            for layer in range(args.layers):
                for kind, t in enumerate((cache.k[layer], cache.v[layer])):
                    t[:, n - 1] = token_values(n, args.batch, layer, kind)[:, None, None]
            if n % TOKENS_PER_PAGE == 1:
                samples.append((n, libc.map_count() - start))
        decode_s = time.perf_counter() - t0
        stats = cache.stats()
        bad = 0
        for layer in tqdm(range(args.layers), desc="read back", unit="layer"):
            for kind, t in enumerate((cache.k[layer], cache.v[layer])):
                want = torch.stack([token_values(n, args.batch, layer, kind)
                                    for n in range(1, args.tokens + 1)], dim=1)
                bad += int((t[:, :, 0, :] != want[:, :, None]).sum())
    finally:
        cache.close()

    most = max(m for _, m in samples)
    slabs = regions * args.batch
    result = {"layers": args.layers, "batch": args.batch, "tokens": args.tokens, "page_size": 4096,
              "tokens_per_page": TOKENS_PER_PAGE, "page_maps": stats["mapped_pages_total"],
              "mapped_bytes": stats["mapped_bytes"], "decode_seconds": round(decode_s, 1),
              "slabs": slabs, "most_mappings": most, "mappings_per_slab": most / slabs,
              "vm_max_map_count": limit, "mappings_before": start, "values_wrong": bad,
              "samples": samples}
    print(f"\n{args.batch} requests x {args.layers} layers decoded to {args.tokens} tokens, 4 KiB pages of "
          f"{TOKENS_PER_PAGE} tokens: {stats['mapped_pages_total']:,} page maps in {decode_s:.0f} s")
    print(f"  most mappings at once:  {most:,} for {slabs:,} slabs ({most / slabs:.2f} per slab); "
          f"one per page would be {stats['mapped_pages_total']:,}")
    print(f"  vm.max_map_count:       {limit:,} (the process held {start:,} before)")
    print(f"  tokens read back wrong: {bad}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    plot(out.with_suffix(".png"), result)
    print(f"saved {out} and {out.with_suffix('.png')}")
    return 0 if bad == 0 else 1


def plot(path: Path, r: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tokens = [n for n, _ in r["samples"]]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(tokens, [m for _, m in r["samples"]], label="pyvattn: mappings held (measured)")
    pages = [r["slabs"] * (-(-n // r["tokens_per_page"])) for n in tokens]
    ax.plot(tokens, pages, "--", label="one mapping per page (before issue 11)")
    ax.axhline(r["vm_max_map_count"], color="red", lw=1, label="vm.max_map_count")
    ax.set_yscale("log")
    ax.set_xlabel("tokens decoded per request")
    ax.set_ylabel("memory mappings (VMAs) of the process")
    ax.set_title(f"host backend: {r['layers']} layers x batch {r['batch']}, 4 KiB pages")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())

"""``python -m pyvattn demo``: KV tensors growing for requests from a real trace.

A small continuous-batching loop: requests from the trace are admitted while slots and the memory
budget allow, prefilled, then decoded one token per step; finished requests free their slot (their
pages stay mapped for the next request, deferred reclaim). Every token's K and V is written with a
value derived from (request, layer, position) and checked when the request finishes, so the demo
also shows that growth, reuse and reclaim never lose data. A table of reserved / physical /
mapped / used bytes is printed as it runs.
"""

from __future__ import annotations

import argparse
import time
from collections import deque
from dataclasses import dataclass

import torch

from .errors import OutOfPages
from .kvcache import KVCache
from .units import format_size, parse_size


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--trace", default="arxiv", help="trace name or CSV path (default: arxiv)")
    p.add_argument("--requests", type=int, default=24, help="requests taken from the trace")
    p.add_argument("--layers", type=int, default=4, help="layers (Llama-3-8B shape: 8 KV heads x 128)")
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--max-batch", type=int, default=16)
    p.add_argument("--max-seq-len", type=int, default=32768)
    p.add_argument("--page-size", default="auto", help="e.g. 64KiB, 2MiB (default: backend's)")
    p.add_argument("--budget", default="1GiB", help="physical memory budget for KV")
    p.add_argument("--device", default="cpu")
    p.add_argument("--backend", default="auto")


@dataclass
class _Running:
    rid: int
    prompt: int
    total: int
    pos: int = 0  # tokens written so far


def _pattern(rid: int, layer: int, start: int, stop: int, kind: int) -> torch.Tensor:
    """Values for tokens [start, stop) that are exact in fp16 and differ per request/layer/K-V."""
    t = torch.arange(start, stop, dtype=torch.int64)
    return ((t * 31 + rid * 17 + layer * 7 + kind * 3) % 2039).to(torch.float32)


class _Writer:
    """Writes and checks the demo's K/V pattern for one request slot."""

    def __init__(self, cache: KVCache):
        self.cache = cache

    def write(self, slot: int, r: _Running, start: int, stop: int) -> None:
        for layer in range(self.cache.num_layers):
            for kind, t in enumerate((self.cache.k[layer], self.cache.v[layer])):
                t[slot, start:stop] = _pattern(r.rid, layer, start, stop, kind)[:, None, None].to(t.dtype)

    def check(self, slot: int, r: _Running) -> bool:
        for layer in range(self.cache.num_layers):
            for kind, t in enumerate((self.cache.k[layer], self.cache.v[layer])):
                got = t[slot, : r.total].float().cpu()
                want = _pattern(r.rid, layer, 0, r.total, kind)[:, None, None].expand_as(got)
                if not torch.equal(got, want):
                    return False
        return True


def run(args: argparse.Namespace) -> int:
    from .frag.traces import load_trace

    trace = load_trace(args.trace)[: args.requests]
    cache = KVCache(args.layers, args.kv_heads, args.head_dim, args.max_batch, args.max_seq_len,
                    dtype=torch.float16, device=args.device, page_size=args.page_size,
                    backend=args.backend, memory_budget=parse_size(args.budget, "--budget"))
    writer = _Writer(cache)
    waiting = deque((i, min(r.prompt_tokens, args.max_seq_len - 1),
                     min(r.prompt_tokens + r.output_tokens, args.max_seq_len)) for i, r in enumerate(trace))
    running: dict[int, _Running] = {}
    print(f"{cache!r}\n{cache.selection.name} backend: {cache.selection.reason}")
    print(f"{len(trace)} requests from trace '{args.trace}'; budget {args.budget}; "
          f"{cache.page_size * 1.0 / cache.token_bytes:g} tokens per page per layer\n")
    header = (f"{'step':>6} {'run':>4} {'wait':>4} {'done':>4} {'reserved':>10} {'physical':>10} "
              f"{'mapped':>10} {'used':>10} {'waste':>7} {'OS alloc':>10}")
    print(header + "\n" + "-" * len(header))
    step = done = bad = preempted = 0
    t0 = time.perf_counter()

    def row(note: str = "") -> None:
        s = cache.stats()
        os_alloc = cache.backend.allocated_bytes() if hasattr(cache.backend, "allocated_bytes") else None
        waste = s["waste_bytes"] / s["mapped_bytes"] if s["mapped_bytes"] else 0.0
        print(f"{step:>6} {len(running):>4} {len(waiting):>4} {done:>4} "
              f"{format_size(s['reserved_bytes']):>10} {format_size(s['physical_bytes']):>10} "
              f"{format_size(s['mapped_bytes']):>10} {format_size(s['used_bytes']):>10} "
              f"{waste:>6.1%} {format_size(os_alloc) if os_alloc is not None else '-':>10}  {note}")

    try:
        while waiting or running:
            admitted = []
            while waiting and len(running) < args.max_batch:
                rid, prompt, total = waiting[0]
                slot = cache.alloc_slot(prompt)
                lens = {s: r.pos + 1 for s, r in running.items()} | {slot: prompt}
                try:
                    cache.step(lens)  # all or nothing: on OutOfPages nothing was mapped
                except OutOfPages:
                    cache.free_slot(slot)
                    break
                waiting.popleft()
                running[slot] = _Running(rid, prompt, total)
                admitted.append(slot)
            try:
                cache.step({s: r.pos + 1 if s not in admitted else r.prompt for s, r in running.items()})
            except OutOfPages:  # decode growth does not fit: preempt the newest request
                slot = max(running, key=lambda s: running[s].rid)
                r = running.pop(slot)
                cache.free_slot(slot)
                waiting.appendleft((r.rid, r.prompt, r.total))
                preempted += 1
                continue
            for slot, r in running.items():
                stop = r.prompt if slot in admitted else r.pos + 1
                writer.write(slot, r, r.pos, stop)
                r.pos = stop
            finished = [s for s, r in running.items() if r.pos >= r.total]
            for slot in finished:
                bad += not writer.check(slot, running[slot])
                cache.free_slot(slot)
                del running[slot]
                done += 1
            if step == 0 or finished:  # one row per completion
                row(f"{len(finished)} finished" if finished else f"{len(admitted)} admitted")
            step += 1
        cache.trim()
        row("after trim(): free slots' pages released")
        s = cache.stats()
        elapsed = time.perf_counter() - t0
        print(f"\n{done} requests in {step} steps ({elapsed:.1f} s); preemptions: {preempted}")
        print(f"map calls: {s['map_calls']}, pages mapped: {s['mapped_pages_total']}, "
              f"reclaimed: {s['reclaimed_pages_total']}, mapping time: {s['map_seconds'] * 1e3:.1f} ms")
        print(f"data check: {'all K/V values read back as written' if not bad else f'{bad} requests CORRUPTED'}")
    finally:
        cache.close()
    return 1 if bad else 0

#!/usr/bin/env python3
"""GPU benchmark of the cuda-vmm backend and of attention on pyvattn memory.

Sections (all in one run, side by side, so ratios compare like with like):

1. growing one request by one page in every layer's K and V (2 x layers maps), on any backend:
   one batched ``backend.map`` vs one ``map`` per page, plus the batched call with 4 pages per
   region (scripts/bench_growth.py takes cuda-vmm's growth apart; scripts/bench_vmm.py times each
   driver call, p50/p99 from 1-8 threads);
2. a decode loop through ``KVCache``, eagerly and (on a GPU) replayed from CUDA graphs captured
   before the cache grows (write each new token's K/V, decode attention in every
   layer, synchronize like a sampler would): a fully pre-mapped cache vs ``step()`` every
   iteration vs ``step_async()`` mapping the next iteration's pages during this one's compute
   (the three interleaved in rounds of 16 steps, so drift over the run falls on all alike; the
   comparison is the median over rounds of each round's mean step, quartiles printed).
   Every step is also taken apart, to find where the slow ones come from: host time in
   ``step()`` (a map, or the join waiting for ``step_async``'s map still running), host time
   launching the step's GPU work (a driver call that blocks launches), the GPU's own time for that
   work (a map running beside it that slows the GPU), and whether a map ran during it; a slow step
   with none of these is the machine. p50, p99 and max per mode, and the causes of the slowest 1%;
3. decode attention on pyvattn tensors vs the same shapes in ordinary ``torch.empty`` memory.

GPU times come from torch.cuda.Event pairs after warmup; the statistic is the median. Saves JSON
(default benchmarks/results/bench_cuda.json). Goals printed with the results: one-page growth of a
32-layer model under 1 ms; step_async within 3% of pre-mapped (median over rounds) and its p99
step within 2% of pre-mapped's; attention within 2% of torch memory.

    python scripts/bench_cuda.py [--layers 32] [--batch 32] [--steps 1024] [--out PATH]
    python scripts/bench_cuda.py --only decode,graphs          # sections: growth,decode,graphs,attention
    python scripts/bench_cuda.py --device cpu --backend host --steps 40   # smoke run, no GPU
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

import benchlib
import resultpath
from benchlib import Clock
from pyvattn import KVCache, attention, backends

MiB = 1 << 20
SECTIONS = ("growth", "decode", "graphs", "attention")


# --- 1. one-page growth of every layer ----------------------------------------------------------
def bench_growth(device: torch.device, backend: str, layers: int, repeat: int) -> dict:
    sel = backends.select(backend, device)
    P = sel.cls.default_page_size(device)
    be = sel.cls(device, P)
    regions = 2 * layers
    per_region = 8
    base = be.reserve(regions * per_region * P)
    handles = be.create_pages(regions * 4)
    one = [base + r * per_region * P for r in range(regions)]  # page 0 of every region
    four = [base + (r * per_region + j) * P for r in range(regions) for j in range(4)]
    res = {"backend": sel.name, "page_size": P, "layers": layers, "maps_per_growth": regions}
    t_batched, t_single, t_four = [], [], []
    for it in range(repeat + 2):  # two warmup rounds
        t0 = time.perf_counter()
        be.map(one, handles[:regions])
        t1 = time.perf_counter()
        be.unmap(one)
        t2 = time.perf_counter()
        for va, h in zip(one, handles[:regions]):
            be.map([va], [h])
        t3 = time.perf_counter()
        be.unmap(one)
        t4 = time.perf_counter()
        be.map(four, handles[:4 * regions])
        t5 = time.perf_counter()
        be.unmap(four)
        if it >= 2:
            t_batched.append(t1 - t0)
            t_single.append(t3 - t2)
            t_four.append(t5 - t4)
    be.release_pages(handles)
    be.unreserve(base, regions * per_region * P)
    be.close()
    res.update(batched_ms=statistics.median(t_batched) * 1e3, per_page_calls_ms=statistics.median(t_single) * 1e3,
               batched_4_pages_per_region_ms=statistics.median(t_four) * 1e3)
    return res


# --- 2. decode loop through KVCache ------------------------------------------------------------
MODEL = dict(kv_heads=8, q_heads=32, head_dim=128)  # Llama-3-8B-like attention shapes


def _cache(args, device, layers: int | None = None) -> KVCache:
    return KVCache(layers or args.layers, MODEL["kv_heads"], MODEL["head_dim"], args.batch, args.max_seq,
                   dtype=args.dtype, device=device, backend=args.backend)


def _start_lengths(cache: KVCache, batch: int, steps: int) -> list[int]:
    """Staggered lengths so that every request crosses a page boundary during the loop."""
    tpp = cache.page_size // cache.token_bytes
    spread = max(1, min(tpp, steps) - 1)
    return [tpp + (tpp - 1 - (b * spread) // max(1, batch - 1) % tpp) for b in range(batch)]


class StepClock:
    """The parts of one decode step: host time in ``step()``, in launching the step's GPU work and
    in ``step_async()``; the GPU's time for that work (events around the launch, on its stream);
    the whole step from before ``step()`` to the synchronize after it, as a sampler would see it."""

    PARTS = ("total_ms", "step_ms", "launch_ms", "submit_ms", "gpu_ms")

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.log: dict[str, list] = {k: [] for k in (*self.PARTS, "map_in_step", "async_map", "round")}

    def _event(self):
        if not self.cuda:
            return time.perf_counter()
        ev = torch.cuda.Event(enable_timing=True)
        ev.record()
        return ev

    @staticmethod
    def _ms(a, b) -> float:
        return a.elapsed_time(b) if not isinstance(a, float) else (b - a) * 1e3

    def step(self, do_step, do_launch, do_submit) -> dict:
        """Run one step's three phases and return their times (the end synchronizes)."""
        e0 = self._event()
        h0 = time.perf_counter()
        do_step()
        h1 = time.perf_counter()
        g0 = self._event()
        do_launch()
        g1 = self._event()
        h2 = time.perf_counter()
        do_submit()
        h3 = time.perf_counter()
        e1 = self._event()
        if self.cuda:
            e1.synchronize()
        return {"total_ms": self._ms(e0, e1), "step_ms": (h1 - h0) * 1e3, "launch_ms": (h2 - h1) * 1e3,
                "submit_ms": (h3 - h2) * 1e3, "gpu_ms": self._ms(g0, g1)}

    def record(self, times: dict, map_in_step: bool, async_map: bool, round_no: int) -> None:
        for k, v in times.items():
            self.log[k].append(v)
        self.log["map_in_step"].append(map_in_step)
        self.log["async_map"].append(async_map)
        self.log["round"].append(round_no)


def crossing(lens: np.ndarray, token_bytes: int, page_size: int) -> bool:
    """Whether growing every request from ``lens`` to ``lens + 1`` tokens needs a new page."""
    pages = lambda n: -(-n * token_bytes // page_size)  # noqa: E731
    return bool((pages(lens + 1) > pages(lens)).any())


def tail_causes(log: dict, slow_fraction: float = 0.01) -> dict:
    """Why the slowest steps (the top ``slow_fraction``, at least one) were slow.

    Each slow step gets every cause that holds: ``map in step()`` (a synchronous map),
    ``join wait`` (``step()`` waited > 0.5 ms with nothing to map itself: ``step_async``'s map
    from the previous step was still running), ``launch blocked`` (launching took > 1 ms over its
    median), ``GPU slower`` (the GPU's time for the step's work > 1.2x its median), ``map beside
    the GPU work`` (a ``step_async`` map was issued while this step's work ran); ``machine`` when
    none holds. Also the GPU time of steps with and without a map beside them (does a map slow
    the GPU?)."""
    total = np.asarray(log["total_ms"])
    n = len(total)
    if n == 0:
        return {}
    order = np.argsort(total)[::-1][:max(1, int(round(n * slow_fraction)))]
    step, launch, gpu = (np.asarray(log[k]) for k in ("step_ms", "launch_ms", "gpu_ms"))
    mapped, beside = np.asarray(log["map_in_step"]), np.asarray(log["async_map"])
    after_async = np.concatenate(([False], beside[:-1]))
    launch_p50, gpu_p50 = np.median(launch), np.median(gpu)
    causes: dict[str, int] = {}
    slow = []
    for i in order.tolist():
        why = [c for c, hit in (("map in step()", mapped[i]),
                                ("join wait", after_async[i] and not mapped[i] and step[i] > 0.5),
                                ("launch blocked", launch[i] > launch_p50 + 1.0),
                                ("GPU slower", gpu[i] > 1.2 * gpu_p50),
                                ("map beside the GPU work", beside[i])) if hit] or ["machine"]
        for c in why:
            causes[c] = causes.get(c, 0) + 1
        slow.append({"index": i, "total_ms": float(total[i]), "step_ms": float(step[i]),
                     "launch_ms": float(launch[i]), "gpu_ms": float(gpu[i]), "causes": why})
    gpu_beside = gpu[beside] if beside.any() else np.array([])
    gpu_alone = gpu[~beside]
    return {"slow_steps": len(order), "threshold_ms": float(total[order[-1]]), "causes": causes, "slowest": slow[:10],
            "gpu_ms_p50_with_map_beside": float(np.median(gpu_beside)) if len(gpu_beside) else None,
            "gpu_ms_p50_without": float(np.median(gpu_alone)) if len(gpu_alone) else None,
            "steps_with_map_beside": int(beside.sum()), "steps_mapping_in_step": int(mapped.sum())}


def bench_decode_loop(args, device: torch.device, graphs: bool = False) -> dict:
    """The three modes run interleaved, a slice of steps each in turn, so clock and thermal drift
    over the run fall on all of them alike.

    With ``graphs``, each mode's per-step GPU work (K/V writes and decode attention in every layer)
    is captured once in a CUDA graph and replayed every step, as serving engines do for decode:
    the host is then idle while the GPU works, which is when ``step_async`` can overlap mapping.
    The graph is captured before the cache grows and stays valid while pages are mapped under its
    fixed addresses: that is the point of contiguous virtual KV memory."""
    gen = torch.Generator(device=device).manual_seed(0)
    modes = ("premapped", "step", "step_async")
    runs = {}
    for mode in modes:
        cache = _cache(args, device)
        slots = [cache.alloc_slot() for _ in range(args.batch)]
        lens0 = _start_lengths(cache, args.batch, args.steps)
        if mode == "premapped":
            cache.step({s: n + args.steps + 1 for s, n in zip(slots, lens0)})
        cache.step({s: n for s, n in zip(slots, lens0)})
        for layer in range(args.layers):  # the prompt's K/V (values only matter for NaN-freedom)
            for s, n in zip(slots, lens0):
                cache.k[layer][s, :n].normal_(generator=gen)
                cache.v[layer][s, :n].normal_(generator=gen)
        slot_t = torch.tensor(slots, dtype=torch.int32, device=device)
        runs[mode] = dict(cache=cache, slots=slots, slot_t=slot_t, slot_l=slot_t.long(),
                          lens=np.array(lens0, dtype=np.int64), clock=StepClock(device), it=0,
                          map_s0=cache.stats()["map_seconds"],
                          pos=torch.zeros(args.batch, dtype=torch.int64, device=device),
                          seqlens=torch.ones(args.batch, dtype=torch.int32, device=device))
    q = torch.randn(args.batch, 1, MODEL["q_heads"], MODEL["head_dim"], dtype=args.dtype,
                    device=device, generator=gen)
    kv_new = torch.randn(args.batch, MODEL["kv_heads"], MODEL["head_dim"], dtype=args.dtype,
                         device=device, generator=gen)

    def forward(r: dict) -> None:
        cache, slot_t, slot_l, pos, seqlens = r["cache"], r["slot_t"], r["slot_l"], r["pos"], r["seqlens"]
        for layer in range(args.layers):
            cache.k[layer][slot_l, pos] = kv_new
            cache.v[layer][slot_l, pos] = kv_new
            attention.decode(q, cache.k[layer], cache.v[layer], seqlens, slots=slot_t)

    if graphs:
        for r in runs.values():
            # static inputs hold a valid step (the last prompt token) while warming up and capturing
            r["pos"].copy_(torch.from_numpy(r["lens"] - 1))
            r["seqlens"].copy_(torch.from_numpy(r["lens"].astype(np.int32)))
            side = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):
                for _ in range(2):
                    forward(r)
            torch.cuda.current_stream(device).wait_stream(side)
            r["graph"] = torch.cuda.CUDAGraph()
            with torch.cuda.graph(r["graph"]):
                forward(r)

    def one_step(mode: str, round_no: int) -> None:
        r = runs[mode]
        cache, slots = r["cache"], r["slots"]
        nxt = r["lens"] + 1
        tb, P = cache.token_bytes, cache.page_size

        def do_step():
            cache.step(dict(zip(slots, nxt.tolist())))  # joins step_async's work; maps if still needed
            r["pos"].copy_(torch.from_numpy(nxt - 1), non_blocking=True)
            r["seqlens"].copy_(torch.from_numpy(nxt.astype(np.int32)), non_blocking=True)

        def do_launch():
            if graphs:
                r["graph"].replay()
            else:
                forward(r)

        def do_submit():
            if mode == "step_async":
                cache.step_async(dict(zip(slots, (nxt + 1).tolist())))

        times = r["clock"].step(do_step, do_launch, do_submit)  # synchronizes, like sampling would
        if r["it"] >= args.warmup:
            r["clock"].record(times, map_in_step=mode == "step" and crossing(r["lens"], tb, P),
                              async_map=mode == "step_async" and crossing(nxt, tb, P), round_no=round_no)
        r["it"] += 1
        r["lens"] = nxt

    rounds = max(1, args.steps // 16)
    for round_no in range(rounds):
        for mode in modes:
            for _ in range(args.steps * (round_no + 1) // rounds - args.steps * round_no // rounds):
                one_step(mode, round_no)
    results = {"interleaved_rounds": rounds, "cuda_graphs": graphs}
    round_means = {}
    for mode in modes:
        r = runs[mode]
        s = r["cache"].stats()
        log = r["clock"].log
        times = log["total_ms"]
        by_round: dict[int, list[float]] = {}
        for k, ms in zip(log["round"], times):
            by_round.setdefault(k, []).append(ms)
        round_means[mode] = {k: statistics.fmean(v) for k, v in by_round.items()}
        total = benchlib.summary(times)
        results[mode] = {"median_step_ms": total["p50"], "mean_step_ms": total["mean"], "p99_step_ms": total["p99"],
                         "max_step_ms": total["max"], "map_calls": s["map_calls"],
                         "map_seconds": s["map_seconds"] - r["map_s0"], "mapped_pages_total": s["mapped_pages_total"],
                         "parts_ms": {k: benchlib.summary(log[k]) for k in StepClock.PARTS},
                         "tail": tail_causes(log),
                         "steps": {k: [round(x, 3) for x in log[k]] for k in StepClock.PARTS}}
        r["cache"].close()
    base = results["premapped"]["mean_step_ms"]
    # Per round, each mode's mean step over the same stretch of the run (a map step included,
    # about one per round); the median over rounds keeps one host hiccup (tens of ms on a shared
    # VM) from deciding the comparison, and the quartiles show the spread.
    pre = round_means["premapped"]
    for mode in ("step", "step_async"):
        results[mode]["mean_vs_premapped"] = results[mode]["mean_step_ms"] / base
        results[mode]["p99_vs_premapped"] = results[mode]["p99_step_ms"] / results["premapped"]["p99_step_ms"]
        rm = round_means[mode]
        ratios = [rm[k] / pre[k] for k in sorted(rm) if k in pre]
        q1, q2, q3 = np.percentile(ratios, [25, 50, 75])
        results[mode].update(round_median_vs_premapped=float(q2), round_q1_vs_premapped=float(q1),
                             round_q3_vs_premapped=float(q3))
    results["attention_impl"] = attention.backend_name(device, dtype=args.dtype)
    return results


def render_decode(dl: dict, args) -> str:
    lines = [f"\ndecode loop{' from CUDA graphs' if dl['cuda_graphs'] else ''}: {args.layers} layers, batch "
             f"{args.batch}, {args.steps} steps, attention via {dl['attention_impl']}"]
    head = ["mode", "p50 ms", "p99 ms", "max ms", "mean ms", "mean vs pre", "p99 vs pre",
            "per-round vs pre: median [q1, q3]", "map calls"]
    rows = []
    for mode in ("premapped", "step", "step_async"):
        r = dl[mode]
        rounds = (f"{r['round_median_vs_premapped']:.3f}x [{r['round_q1_vs_premapped']:.3f}, "
                  f"{r['round_q3_vs_premapped']:.3f}]") if "round_median_vs_premapped" in r else "-"
        rows.append([mode, f"{r['median_step_ms']:.3f}", f"{r['p99_step_ms']:.3f}", f"{r['max_step_ms']:.3f}",
                     f"{r['mean_step_ms']:.3f}", f"{r['mean_vs_premapped']:.3f}x" if "mean_vs_premapped" in r else "-",
                     f"{r['p99_vs_premapped']:.3f}x" if "p99_vs_premapped" in r else "-", rounds, r["map_calls"]])
    lines.append(benchlib.table(head, rows))
    head = ["mode", "slow steps (>= ms)", "causes of the slowest 1%", "GPU ms p50: map beside / none",
            "step() p50 / max ms", "launch p50 / max ms"]
    rows = []
    for mode in ("premapped", "step", "step_async"):
        t, parts = dl[mode]["tail"], dl[mode]["parts_ms"]
        beside = t["gpu_ms_p50_with_map_beside"]
        rows.append([mode, f"{t['slow_steps']} (>= {t['threshold_ms']:.2f})",
                     ", ".join(f"{c} {n}" for c, n in sorted(t["causes"].items(), key=lambda kv: -kv[1])),
                     f"{beside:.3f} / {t['gpu_ms_p50_without']:.3f}" if beside is not None else
                     f"- / {t['gpu_ms_p50_without']:.3f}",
                     f"{parts['step_ms']['p50']:.3f} / {parts['step_ms']['max']:.3f}",
                     f"{parts['launch_ms']['p50']:.3f} / {parts['launch_ms']['max']:.3f}"])
    lines.append(benchlib.table(head, rows))
    ok = dl["step_async"]["round_median_vs_premapped"] <= 1.03
    ok99 = dl["step_async"]["p99_vs_premapped"] <= 1.02
    lines.append(f"  step_async within 3% of premapped (median over {dl['interleaved_rounds']} interleaved rounds): "
                 f"{'met' if ok else 'NOT met'}; p99 within 2%: {'met' if ok99 else 'NOT met'}")
    return "\n".join(lines)


# --- 3. attention on pyvattn memory vs torch memory --------------------------------------------
def bench_attention(args, device: torch.device) -> dict:
    clock = Clock(device)
    cache = _cache(args, device, layers=1)  # one layer's K and V: the same shapes as torch.empty's
    slots = [cache.alloc_slot() for _ in range(args.batch)]
    L = args.attn_len
    cache.step({s: L for s in slots})
    gen = torch.Generator(device=device).manual_seed(1)
    k_py, v_py = cache.k[0], cache.v[0]
    k_py[:, :L].normal_(generator=gen)
    v_py[:, :L].normal_(generator=gen)
    k_t = torch.empty(k_py.shape, dtype=args.dtype, device=device)
    v_t = torch.empty_like(k_t)
    k_t[:, :L] = k_py[:, :L]
    v_t[:, :L] = v_py[:, :L]
    q = torch.randn(args.batch, 1, MODEL["q_heads"], MODEL["head_dim"], dtype=args.dtype, device=device,
                    generator=gen)
    lens = torch.full((args.batch,), L, dtype=torch.int32, device=device)
    slot_t = torch.tensor(slots, dtype=torch.int32, device=device)
    inner = 20
    t_py, t_torch = [], []
    for it in range(args.repeat + 3):  # interleaved; 3 warmup rounds
        for kc, vc, sink in ((k_py, v_py, t_py), (k_t, v_t, t_torch)):
            t = clock.start()
            for _ in range(inner):
                attention.decode(q, kc, vc, lens, slots=slot_t)
            ms = clock.stop(t) / inner
            if it >= 3:
                sink.append(ms)
    same = torch.equal(attention.decode(q, k_py, v_py, lens, slots=slot_t),
                       attention.decode(q, k_t, v_t, lens, slots=slot_t))
    cache.close()
    py, tt = statistics.median(t_py), statistics.median(t_torch)
    return {"batch": args.batch, "seq_len": L, "impl": attention.backend_name(device, dtype=args.dtype),
            "pyvattn_ms": py, "torch_empty_ms": tt, "ratio": py / tt, "identical_outputs": same}


# --- main ---------------------------------------------------------------------------------------
def sections_arg(value: str) -> list[str]:
    """argparse type: a comma-separated subset of ``SECTIONS``."""
    out = [x.strip() for x in value.split(",") if x.strip()]
    bad = [x for x in out if x not in SECTIONS]
    if not out or bad:
        raise argparse.ArgumentTypeError(f"{value!r}: sections are {','.join(SECTIONS)}")
    return out


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", type=benchlib.device_arg, default="cuda")
    ap.add_argument("--backend", default="cuda-vmm", help="cuda-vmm, uvm64k, auto (host with --device cpu)")
    ap.add_argument("--layers", type=benchlib.positive_int, default=32)
    ap.add_argument("--batch", type=benchlib.positive_int, default=32)
    ap.add_argument("--max-seq", type=benchlib.positive_int, default=8192)
    ap.add_argument("--steps", type=benchlib.positive_int, default=1024, help="decode-loop iterations per mode")
    ap.add_argument("--warmup", type=benchlib.nonnegative_int, default=8)
    ap.add_argument("--attn-len", type=benchlib.positive_int, default=4096)
    ap.add_argument("--repeat", type=benchlib.positive_int, default=15)
    ap.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"],
                    help="float32 for CPU smoke runs (the flash paths are fp16/bf16)")
    ap.add_argument("--only", type=sections_arg, default=list(SECTIONS),
                    help=f"sections to run, of {','.join(SECTIONS)} (default: all; graphs needs a GPU)")
    resultpath.add_output_arguments(ap, "bench_cuda")
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    args.dtype = getattr(torch, args.dtype)
    device = args.device

    if device.type == "cuda":
        if not torch.cuda.is_available():
            print("bench_cuda.py needs a CUDA GPU: torch sees none (use --device cpu --backend host "
                  "for a smoke run)", file=sys.stderr)
            return 2
        torch.cuda.init()
        device = torch.device("cuda", torch.cuda.current_device())
    probe = backends.probe(args.backend, device) if args.backend != "auto" else None
    if probe is not None and not probe.available:
        print(f"bench_cuda.py: backend {args.backend} cannot run on {device}: {probe.reason}", file=sys.stderr)
        return 2
    out_path = Path(args.out)

    result = {"machine": {**benchlib.machine_facts(device), "flash_attn": attention.flash_available()},
              "args": {k: str(v) for k, v in vars(args).items()}}
    if "growth" in args.only:
        g = result["growth"] = bench_growth(device, args.backend, args.layers, args.repeat)
        print(f"\ngrow one request by one page in all {args.layers} layers' K and V "
              f"({g['maps_per_growth']} maps, {g['backend']}, {g['page_size'] // 1024} KiB pages)")
        print(f"  one batched map():            {g['batched_ms']:8.3f} ms  (goal < 1 ms: "
              f"{'met' if g['batched_ms'] < 1 else 'NOT met'})")
        print(f"  one map() per page:           {g['per_page_calls_ms']:8.3f} ms")
        print(f"  batched, 4 pages per region:  {g['batched_4_pages_per_region_ms']:8.3f} ms "
              f"({g['batched_4_pages_per_region_ms'] / 4:.3f} ms per page-of-growth)")

    for key, section, graphs in (("decode_loop", "decode", False), ("decode_loop_cuda_graphs", "graphs", True)):
        if section not in args.only or (graphs and device.type != "cuda"):
            continue
        dl = result[key] = bench_decode_loop(args, device, graphs=graphs)
        print(render_decode(dl, args), flush=True)

    if "attention" in args.only:
        a = result["attention"] = bench_attention(args, device)
        print(f"\ndecode attention, batch {a['batch']}, {a['seq_len']} tokens, {a['impl']}: "
              f"pyvattn {a['pyvattn_ms']:.4f} ms vs torch.empty {a['torch_empty_ms']:.4f} ms = "
              f"{a['ratio']:.3f}x (goal within 2%: {'met' if a['ratio'] <= 1.02 else 'NOT met'}); "
              f"outputs identical: {a['identical_outputs']}")

    print()
    benchlib.save_json(out_path, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Generation side by side: transformers' caches against pyvattn, same model, same requests.

Methods (greedy, every request gets its own ``max_new_tokens``):

* ``hf-dynamic``   transformers ``generate`` with its DynamicCache, static batches of ``--batch``
                   left-padded requests (a batch runs until its longest request is done)
* ``hf-static``    the same with its StaticCache, sized for ``--max-seq-len`` as a server must
* ``hf-paged-cb``  transformers' own continuous batching (``generate_batch``, PagedAttentionCache),
                   its block pool sized to ``--budget``
* ``pyvattn-hf``   transformers ``generate`` with ``VAttentionCache``, the same static batches
* ``pyvattn-engine`` ``pyvattn.engine.Engine``: continuous batching, ``--max-batch`` requests at once,
                   ``--budget`` of KV memory mapped on demand

Reported: useful tokens/s (each request's own tokens; padding and over-generation not counted),
peak KV bytes the method held (tensor bytes for transformers' caches; pages mapped for pyvattn:
its memory is not torch's, so ``torch.cuda.max_memory_allocated`` would not see it), and how many
requests got exactly the tokens ``hf-dynamic`` gave. Methods run in interleaved rounds; the median
round is reported. The model is a small config with random weights (``--model-config``).

    python scripts/bench_generate.py                     # CPU, table + JSON under bench-results/
    python scripts/bench_generate.py --device cuda --dtype bfloat16 --model-config llama-tiny
    python scripts/bench_generate.py --save              # JSON to benchmarks/results/ instead

GPU-ready: ``--device cuda`` runs every method on the GPU (pyvattn picks uvm64k or cuda-vmm);
a GPU machine that reaches no package registry needs the wheels (torch, transformers and their
dependencies) brought along. Only CPU numbers have been taken so far (docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

import resultpath

METHODS = ("hf-dynamic", "hf-static", "hf-paged-cb", "pyvattn-hf", "pyvattn-engine")


def parse_args(argv=None) -> argparse.Namespace:
    from pyvattn.frag.traces import SHIPPED
    from pyvattn.integrations.tiny import TINY_MODELS

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model-config", default="llama-tiny", choices=sorted(TINY_MODELS))
    p.add_argument("--trace", default="sharegpt", help=f"lengths from {sorted(SHIPPED)} or a trace file")
    p.add_argument("--requests", type=int, default=48)
    p.add_argument("--scale", type=float, default=0.1, help="multiply the trace's lengths (default 0.1)")
    p.add_argument("--max-seq-len", type=int, default=1024)
    p.add_argument("--batch", type=int, default=16, help="static batch size of the generate() methods")
    p.add_argument("--max-batch", type=int, default=16, help="requests at once in continuous batching")
    p.add_argument("--budget", default="32MiB", help="KV memory of the continuous-batching methods")
    p.add_argument("--page-size", default="auto", help="pyvattn page size (default: the backend's)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float64", "bfloat16", "float16"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {METHODS}")
    p.add_argument("--seed", type=int, default=0)
    resultpath.add_output_arguments(p, "bench_generate")
    args = p.parse_args(argv)
    unknown = set(args.methods.split(",")) - set(METHODS)
    if unknown:
        p.error(f"--methods: {sorted(unknown)} are not among {METHODS}")
    for name in ("requests", "max_seq_len", "batch", "max_batch", "rounds"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    return args


def workload(args, vocab: int) -> list[tuple[list[int], int]]:
    from pyvattn.frag.traces import load_trace

    rng = random.Random(args.seed)
    work = []
    for r in load_trace(args.trace, args.requests):
        new = max(1, min(round(r.output_tokens * args.scale), args.max_seq_len // 4))
        prompt = max(1, min(round(r.prompt_tokens * args.scale), args.max_seq_len - new))
        work.append(([rng.randrange(3, vocab) for _ in range(prompt)], new))
    return work


def batches(work, size):
    for i in range(0, len(work), size):
        yield work[i:i + size]


def left_pad(chunk, device):
    width = max(len(p) for p, _ in chunk)
    ids = torch.zeros(len(chunk), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, (p, _) in enumerate(chunk):
        ids[row, width - len(p):] = torch.tensor(p)
        mask[row, width - len(p):] = 1
    return ids.to(device), mask.to(device)


def run_generate(model, work, args, make_cache=None, **kw):
    """Static batches through ``generate``: (outputs, peak KV bytes)."""
    outputs, peak = [], 0
    for chunk in batches(work, args.batch):
        ids, mask = left_pad(chunk, model.device)
        longest = max(n for _, n in chunk)
        cache = make_cache() if make_cache else None
        extra = {"cache": cache} if cache is not None else {}
        out = model.generate(ids, attention_mask=mask, max_new_tokens=longest, min_new_tokens=longest,
                             do_sample=False, pad_token_id=0, eos_token_id=None, return_dict_in_generate=True,
                             **extra, **kw)
        for row, (_, n) in enumerate(chunk):
            outputs.append(out.sequences[row, ids.shape[1]:ids.shape[1] + n].tolist())
        used = out.cache
        if hasattr(used, "stats"):
            peak = max(peak, used.stats()["mapped_bytes"])
            used.close()
        else:
            peak = max(peak, sum(t.nbytes for layer in used.layers for t in (layer.keys, layer.values)))
    return outputs, peak


def run_paged_cb(model, work, args, budget):
    from transformers import GenerationConfig
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    from pyvattn.integrations.transformers import cache_shape

    layers, kv_heads, head_dim = cache_shape(model.config)
    block = 16
    block_bytes = 2 * layers * block * kv_heads * head_dim * torch.empty((), dtype=model.dtype).element_size()
    cb = ContinuousBatchingConfig(page_size=block, num_blocks=max(1, budget // block_bytes),
                                  max_requests_per_batch=args.max_batch, use_cuda_graph=False)
    gc = GenerationConfig(max_new_tokens=max(n for _, n in work), do_sample=False, eos_token_id=None, pad_token_id=0)
    manager = model.init_continuous_batching(generation_config=gc, continuous_batching_config=cb)
    manager.start()
    try:
        ids = [manager.add_request(p, request_id=f"r{i}", max_new_tokens=n) for i, (p, n) in enumerate(work)]
        outputs = {}
        while len(outputs) < len(work):
            result = manager.get_result(timeout=10)
            if result is None:
                raise RuntimeError("transformers' continuous batching stopped before finishing")
            if result.is_finished():
                outputs[result.request_id] = result.generated_tokens
        peak = manager.batch_processor.cache.cache_tensor.nbytes  # the block pool, allocated up front
    finally:
        manager.stop(block=True)
    return [outputs[i] for i in ids], peak


def run_engine(model, work, args, budget):
    from pyvattn.engine import Engine

    peak = 0
    with Engine.for_model(model, args.max_batch, args.max_seq_len, max_batched_tokens=1024,
                          memory_budget=budget, page_size=args.page_size) as engine:
        requests = [engine.submit(p, n) for p, n in work]
        while engine.has_work:
            engine.step()
            peak = max(peak, engine.kv.stats()["mapped_bytes"])
    return [r.output for r in requests], peak


def main(argv=None) -> int:
    args = parse_args(argv)
    from pyvattn.integrations.tiny import build_model
    from pyvattn.integrations.transformers import VAttentionCache
    from pyvattn.units import format_size, parse_size

    if args.threads:
        torch.set_num_threads(args.threads)
    budget = parse_size(args.budget, "--budget")
    dtype = getattr(torch, args.dtype)
    model = build_model(args.model_config, dtype=dtype, device=args.device, seed=args.seed)
    work = workload(args, model.config.vocab_size)
    useful = sum(n for _, n in work)
    methods = args.methods.split(",")
    vkw = {} if args.page_size == "auto" else {"page_size": args.page_size}
    runners = {
        "hf-dynamic": lambda: run_generate(model, work, args),
        "hf-static": lambda: run_generate(model, work, args, cache_implementation="static", disable_compile=True,
                                          max_cache_len=args.max_seq_len),
        "hf-paged-cb": lambda: run_paged_cb(model, work, args, budget),
        "pyvattn-hf": lambda: run_generate(model, work, args, make_cache=lambda: VAttentionCache(
            model.config, args.batch, args.max_seq_len, dtype=dtype, device=args.device, **vkw)),
        "pyvattn-engine": lambda: run_engine(model, work, args, budget),
    }
    print(f"{args.model_config} {args.dtype} on {args.device}: {len(work)} requests from '{args.trace}' x "
          f"{args.scale:g} (prompts {sum(len(p) for p, _ in work)} tokens, outputs {useful} tokens)")
    times = {m: [] for m in methods}
    results = {}
    for _ in tqdm(range(args.rounds), desc="rounds", unit="round", file=sys.stdout):
        for m in methods:  # interleaved: a slow moment of the machine hits every method alike
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            outputs, peak = runners[m]()
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            times[m].append(time.perf_counter() - t0)
            results[m] = (outputs, peak)
    ref = results.get("hf-dynamic", next(iter(results.values())))[0]
    rows = []
    base = statistics.median(times[methods[0]])
    for m in methods:
        outputs, peak = results[m]
        t = statistics.median(times[m])
        rows.append({"method": m, "seconds": t, "tokens_per_s": useful / t, "speed_vs_first": base / t,
                     "peak_kv_bytes": peak, "same_tokens_as_hf_dynamic": sum(a == b for a, b in zip(outputs, ref))})
    header = f"| method | tokens/s | speed vs {methods[0]} | peak KV | requests with hf-dynamic's tokens |"
    print("\n" + header + "\n|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['method']} | {r['tokens_per_s']:.0f} | {r['speed_vs_first']:.2f}x | "
              f"{format_size(r['peak_kv_bytes'])} | {r['same_tokens_as_hf_dynamic']}/{len(work)} |")
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"args": vars(args), "machine": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "threads": torch.get_num_threads(),
            "transformers": __import__("transformers").__version__, "useful_tokens": useful,
            "round_seconds": times}
    path.write_text(json.dumps({"meta": meta, "results": rows}, indent=2) + "\n")
    print(f"\nsaved {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

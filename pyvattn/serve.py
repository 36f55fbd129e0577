"""``python -m pyvattn serve``: a model served by pyvattn's continuous-batching engine.

Requests take their prompt and output lengths from a trace (scaled down, so that a small model
on a CPU gets through them in seconds) and random token ids, after ``--shared-prefix`` tokens
every prompt starts with (a system prompt: with prefix caching, on unless
``--no-prefix-caching``, its whole pages are computed once and shared); a transformers model of a small
config with random weights generates them (``pyvattn.engine``), its KV cache in a
``pyvattn.KVCache``. A progress bar shows tokens/s, requests running and waiting, and the KV memory
mapped; ``--verify`` then generates every request alone with transformers and checks the tokens
are the same.

Arguments are checked before torch is imported: ``serve --help`` and a bad argument answer at once
(exit 2, one line).
"""

from __future__ import annotations

import argparse
import sys

from .argtypes import non_negative_float, non_negative_int, positive_int
from .units import parse_size


def add_arguments(p: argparse.ArgumentParser) -> None:
    from .frag.traces import SHIPPED
    from .integrations.tiny import TINY_MODELS

    p.add_argument("--trace", default="arxiv", help=f"one of {sorted(SHIPPED)} or a trace file (default: arxiv)")
    p.add_argument("--model-config", default="llama-tiny", help=f"one of {sorted(TINY_MODELS)} (random weights)")
    p.add_argument("--requests", type=positive_int, default=32, help="requests taken from the trace (default: 32)")
    p.add_argument("--scale", type=non_negative_float, default=0.05,
                   help="multiply the trace's prompt and output lengths by this (default: 0.05)")
    p.add_argument("--max-seq-len", type=positive_int, default=2048, help="tokens per request, at most")
    p.add_argument("--max-batch", type=positive_int, default=16, help="requests running at once, at most")
    p.add_argument("--max-batched-tokens", type=positive_int, default=1024,
                   help="tokens per forward pass (decode tokens, then prompt chunks)")
    p.add_argument("--budget", default="4MiB", help="physical KV memory budget (default: 4MiB)")
    p.add_argument("--page-size", default="auto", help="KV page size, e.g. 4KiB, 64KiB, 2MiB (default: backend's)")
    p.add_argument("--rate", type=non_negative_float, default=0.0,
                   help="Poisson arrivals per second (default 0: all requests arrive at once)")
    p.add_argument("--shared-prefix", type=non_negative_int, default=0, metavar="N",
                   help="every prompt starts with the same N random tokens, a system prompt (default: 0)")
    p.add_argument("--no-prefix-caching", dest="prefix_caching", action="store_false",
                   help="compute every prompt from its first token (default: reuse cached prefixes)")
    p.add_argument("--dtype", choices=["float32", "float64", "bfloat16", "float16"], default="float32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--backend", default="auto", help="KVCache backend: auto, host, cuda-vmm, uvm64k")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--verify", action="store_true",
                   help="generate each request alone with transformers afterwards and compare the tokens")


def check_arguments(args: argparse.Namespace) -> None:
    """``ValueError`` naming the argument, for what argparse cannot check (no torch needed)."""
    from .frag.traces import trace_path
    from .integrations.tiny import check_name

    trace_path(args.trace)
    check_name(args.model_config)
    parse_size(args.budget, "--budget")
    if args.page_size != "auto":
        parse_size(args.page_size, "--page-size")
    if args.scale == 0:
        raise ValueError("--scale must be > 0")
    if args.shared_prefix >= args.max_seq_len:
        raise ValueError(f"--shared-prefix {args.shared_prefix} leaves no room for a request's own tokens "
                         f"(--max-seq-len {args.max_seq_len})")


class _Parser(argparse.ArgumentParser):
    """Errors in one line (no usage block), exit status 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m pyvattn serve", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_arguments(p)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        check_arguments(args)
    except ValueError as exc:
        parser.error(str(exc))
    try:
        return run(args)
    except KeyboardInterrupt:  # the engine and its cache are closed on the way out
        print("python -m pyvattn serve: interrupted", file=sys.stderr)
        return 130


def _device(name: str):
    """``torch.device(name)``, or ``ValueError`` if it cannot run here."""
    import torch

    try:
        device = torch.device(name)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"--device {name!r} is not a device: {exc}") from None
    if device.type == "cuda" and (not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count()):
        raise ValueError(f"--device {name!r}: no such CUDA device here")
    return device


def _workload(args, vocab: int):
    """``(prompt ids, max_new_tokens, arrival_s)`` for each request of the trace, scaled; every
    prompt is the shared prefix, then the request's own tokens (at least one)."""
    import random

    from .frag.traces import load_trace

    rng = random.Random(args.seed)
    prefix = [rng.randrange(3, vocab) for _ in range(args.shared_prefix)]
    room = args.max_seq_len - len(prefix)  # >= 1 (check_arguments)
    clock, work = 0.0, []
    for r in load_trace(args.trace, args.requests):
        new = max(1, min(round(r.output_tokens * args.scale), room // 2))
        own = max(1, min(round(r.prompt_tokens * args.scale), room - new + 1))
        if args.rate:
            clock += rng.expovariate(args.rate)
        work.append((prefix + [rng.randrange(3, vocab) for _ in range(own)], new, clock))
    return work


def run(args: argparse.Namespace) -> int:
    import time

    import torch
    from tqdm import tqdm

    from .errors import PyvattnError
    from .integrations.tiny import TINY_MODELS, build_model
    from .kvcache import KVCache
    from .units import format_size

    try:  # the KVCache first: a bad --backend/--page-size/--device is reported before the model is built
        device = _device(args.device)
        dtype = getattr(torch, args.dtype)
        kv = KVCache(*TINY_MODELS[args.model_config].kv_shape, args.max_batch, args.max_seq_len, dtype=dtype,
                     device=device, page_size=args.page_size, backend=args.backend, memory_budget=args.budget)
    except ValueError as exc:
        print(f"python -m pyvattn serve: error: {exc}", file=sys.stderr)
        return 2
    from .engine import Engine  # transformers is imported from here on

    model = build_model(args.model_config, dtype=dtype, device=device, seed=args.seed)
    engine = Engine(model, kv, args.max_batched_tokens, prefix_caching=args.prefix_caching)
    work = _workload(args, model.config.vocab_size)
    print(f"{args.model_config} ({sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters, "
          f"{args.dtype}, {args.device}), {len(work)} requests from '{args.trace}' x {args.scale:g}: "
          f"prompts {sum(len(p) for p, _, _ in work)} tokens ({args.shared_prefix} shared by all), "
          f"outputs {sum(n for _, n, _ in work)} tokens")
    print(f"{kv!r}\n{kv.selection.name} backend: {kv.selection.reason}; budget {args.budget}")
    requests = [engine.submit(p, n, arrival_s=t) for p, n, t in work]
    peak_mapped = 0
    t0 = time.perf_counter()
    with engine, tqdm(total=len(requests), unit="req", file=sys.stdout, dynamic_ncols=True) as bar:
        try:
            while engine.has_work:
                finished = engine.step()
                stats = kv.stats()
                mapped = stats["mapped_bytes"] - stats["shared_pages"] * kv.page_size  # a shared page once
                peak_mapped = max(peak_mapped, mapped)
                elapsed = time.perf_counter() - t0
                bar.set_postfix_str(f"{engine.generated_tokens / elapsed:.0f} tok/s, "
                                    f"run {len(engine.scheduler.running)}, wait {len(engine.scheduler.waiting)}, "
                                    f"KV used {format_size(stats['used_bytes'])}, "
                                    f"mapped {format_size(mapped)}",
                                    refresh=False)
                bar.update(len(finished))
        except PyvattnError as exc:
            bar.close()
            print(f"error: {exc}", file=sys.stderr)
            return 1
        elapsed = time.perf_counter() - t0
        stats = engine.stats()
    print(f"{len(requests)} requests, {engine.generated_tokens} tokens generated in {elapsed:.2f} s "
          f"({engine.generated_tokens / elapsed:.0f} tok/s), {engine.steps} forward passes, "
          f"{stats['preemptions']} preemptions")
    print(f"prefill: {stats['prefill_tokens']} tokens computed, {stats['prefill_tokens_saved']} saved by prefix "
          f"caching ({stats['prefix_cache_hits']} of {stats['admissions']} admissions hit"
          + ("" if args.prefix_caching else "; --no-prefix-caching") + ")")
    print(f"KV memory: peak {format_size(peak_mapped)} mapped of {format_size(parse_size(args.budget, 'budget'))} "
          f"budget ({format_size(stats['reserved_bytes'])} reserved); {stats['map_calls']} map calls, "
          f"{stats['mapped_pages_total']} pages mapped, {stats['reclaimed_pages_total']} reclaimed")
    if not args.verify:
        return 0
    from .integrations.transformers import generate_alone

    bad = [r.rid for r in tqdm(requests, desc="verify", unit="req", file=sys.stdout)
           if generate_alone(model, r.prompt, r.max_new_tokens) != r.output]
    print(f"verify: {len(requests) - len(bad)}/{len(requests)} requests equal to generating them alone"
          + (f"; different: {bad[:10]}" if bad else ""))
    return 1 if bad else 0

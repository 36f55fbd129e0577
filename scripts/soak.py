#!/usr/bin/env python3
"""Soak: a million random operations on host-backend KVCaches, each checked against a model.

The same model as the property test (tests/test_fuzz.py, tests/cachemodel.py): requests arrive
(best-fit slot, or a prompt whose prefix the cache may reuse; prefill step), fork, decode (dict,
tensor, ndarray and list input, foreground and ``step_async``; a request is preempted when the
batch runs out of pages), finish, trim, reserve,
under a budget that forces reclaim, with a failure injected at a random driver call of some
operations (KeyboardInterrupt or ENOMEM). Every operation checks its outcome (a step the model says
fits must succeed and vice versa; seq_len, mapped_tokens); every ``--check-every`` operations the
books are compared with /proc/self/maps and the memfd and every token written is read back. A fresh
cache every ``--cache-every`` operations (alternating deferred reclaim) exercises construction and
close. Prints and saves what was checked.

    python scripts/soak.py [--ops 1000000] [--seed 1] [--out benchmarks/results/soak.json]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from collections import Counter
from pathlib import Path

from tqdm import tqdm

import resultpath

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from cachemodel import MAX_LEN, CacheModel, small_cache  # noqa: E402


def operate(model: CacheModel, rng: random.Random, faults: float) -> None:
    """One random operation on ``model``."""
    active = sorted(model.lengths)
    roll = rng.random()
    if rng.random() < faults and active:
        op, arg = rng.choice([(model.step, {rng.choice(active): rng.randrange(MAX_LEN + 1)}),
                              (model.free, rng.choice(active)), (model.trim, None)])
        args = () if arg is None else (arg,)
        model.with_fault(rng.randrange(1, 6), rng.random() < 0.5, op, *args)
    elif roll < 0.12 or not active:
        prompt = rng.randrange(1, MAX_LEN + 1)
        slot = model.alloc(prompt, rng.randrange(3) if rng.random() < 0.5 else None)  # a family: prefix reuse
        if slot is not None:
            model.step({slot: prompt})
    elif roll < 0.15:
        src = rng.choice(active)
        model.fork(src, rng.randrange(model.lengths[src] + 1))
    elif roll < 0.70:
        tokens = rng.choice((1, 1, 1, 2, 8, 24))
        form = rng.choice(("dict", "dict", "dict", "tensor", "ndarray", "list"))
        if not model.step({s: min(MAX_LEN, n + tokens) for s, n in model.lengths.items()}, form,
                          background=rng.random() < 0.2):
            model.free(rng.choice(active))  # out of pages: preempt a request, as a server would
    elif roll < 0.80:
        slots = rng.sample(active, rng.randrange(1, len(active) + 1))
        model.step({s: rng.randrange(MAX_LEN + 1) for s in slots})
    elif roll < 0.92:
        model.free(rng.choice(active))
    elif roll < 0.96:
        model.trim()
    else:
        model.reserve(rng.randrange(33))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ops", type=int, default=1_000_000)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--check-every", type=int, default=200, help="full check every N operations")
    ap.add_argument("--cache-every", type=int, default=50_000, help="a fresh cache every N operations")
    ap.add_argument("--faults", type=float, default=0.03, help="share of operations with an injected failure")
    resultpath.add_output_arguments(ap, "soak")
    args = ap.parse_args(argv)
    for name in ("ops", "check_every", "cache_every"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1")
    if not 0 <= args.faults <= 1:
        ap.error("--faults must lie in [0, 1]")

    rng = random.Random(args.seed)
    totals: Counter[str] = Counter()
    caches, model, t0 = 0, None, time.perf_counter()
    try:
        for i in tqdm(range(args.ops), desc="soak", unit="op", mininterval=1.0, smoothing=0.05):
            if i % args.cache_every == 0:
                if model is not None:
                    model.check()
                    totals.update(model.counts)
                    model.cache.close()
                model = CacheModel(small_cache(deferred_reclaim=caches % 2 == 0))
                caches += 1
            operate(model, rng, args.faults)
            if (i + 1) % args.check_every == 0:
                model.check()
        model.check()
        totals.update(model.counts)
    finally:
        if model is not None:
            model.cache.close()
    seconds = time.perf_counter() - t0
    report = {"operations": args.ops, "seed": args.seed, "caches": caches, "seconds": round(seconds, 1),
              "checked": dict(sorted(totals.items()))}
    print(f"\n{args.ops:,} operations on {caches} caches in {seconds:.0f} s (seed {args.seed}); "
          f"no failure. What was exercised and checked:")
    for name, n in sorted(totals.items()):
        print(f"  {name:>16}: {n:,}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"saved {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

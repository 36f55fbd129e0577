#!/usr/bin/env python3
"""Time the fragmentation simulation: all 12 schemes on whole traces, up to a million requests.

For each trace: wall time, CPU time of this process and its workers (user + sys), peak resident
memory of the largest process, steps simulated. Prints a table and writes JSON to
bench-results/bench_frag.json (git-ignored; ``--out PATH`` elsewhere), or with ``--save`` to the
committed benchmarks/results/bench_frag.json. Synthetic traces (``synthetic:N``, seeded) are
generated in memory, never written to disk.

    python scripts/bench_frag.py                                  # sharegpt, azure-conv, synthetic:1000000
    python scripts/bench_frag.py --trace /path/to/bwb.csv --trace synthetic:100000
    python scripts/bench_frag.py --save                           # update the committed results
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import time
from pathlib import Path

import resultpath
from pyvattn.argtypes import positive_int
from pyvattn.frag.models import get_model
from pyvattn.frag.report import Experiment, compare
from pyvattn.frag.traces import load_trace


def _cpu() -> float:
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def _peak_rss_mib() -> float:
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return max(own.ru_maxrss, kids.ru_maxrss) / 1024  # KiB on Linux


def bench(trace: str, model: str, budget: int, jobs: int | None) -> dict:
    t0, cpu0 = time.perf_counter(), _cpu()
    exp = Experiment(load_trace(trace), get_model(model), 1, budget, 256)
    loaded = time.perf_counter() - t0
    results = compare(exp, jobs=jobs)
    wall, cpu = time.perf_counter() - t0, _cpu() - cpu0
    return {"trace": trace, "requests": len(exp.trace), "model": model, "budget_bytes": budget,
            "schemes": len(results), "steps": sum(r.steps for r in results), "load_s": round(loaded, 2),
            "wall_s": round(wall, 1), "cpu_s": round(cpu, 1), "peak_rss_mib": round(_peak_rss_mib()),
            "served": min(r.served for r in results), "rejected": max(r.rejected_total for r in results)}


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trace", action="append", help="trace (repeatable)")
    ap.add_argument("--model", default="llama-3-8b")
    ap.add_argument("--budget-gib", type=positive_int, default=40)
    ap.add_argument("--jobs", type=positive_int, default=None, help="worker processes (default: one per CPU)")
    resultpath.add_output_arguments(ap, "bench_frag")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    traces = args.trace or ["sharegpt", "azure-conv", "synthetic:1000000"]
    try:
        get_model(args.model)
        for trace in traces:  # every name checked before the first (long) run
            load_trace(trace, 1)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    load_before = os.getloadavg()
    rows = []
    for trace in traces:
        rows.append(bench(trace, args.model, args.budget_gib << 30, args.jobs))
        r = rows[-1]
        print(f"{Path(r['trace']).name:>20} {r['requests']:>9,} req  {r['wall_s']:>7.1f} s wall  "
              f"{r['cpu_s']:>7.1f} s CPU  {r['peak_rss_mib']:>6} MiB peak  {r['steps']:>12,} steps", flush=True)
    load = os.getloadavg()
    doc = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform(),
                       "load_average_before": [round(x, 2) for x in load_before],
                       "load_average_after": [round(x, 2) for x in load]},
           "note": "12 schemes per trace in worker processes (one per CPU); cpu_s counts all of them; "
                   "the machine may be shared: compare cpu_s / cpus with wall_s",
           "runs": rows}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {out} (load average {load[0]:.1f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

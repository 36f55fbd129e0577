"""python -m pyvattn frag: compare KV-cache allocation schemes on a request trace.

Simulates a continuous-batching server (vLLM's admission and recompute preemption) over every
scheme (static reservation, paged blocks, vAttention pages with and without deferred reclaim),
then prints a markdown table and writes JSON and PNG plots.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from pathlib import Path

# Only light imports here: `--help` must answer at once (no torch).
from ..argtypes import fraction, positive_float, positive_int
from .models import model_names
from .traces import SHIPPED, SYNTHETIC

DEFAULT_OUT = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "pyvattn" / "frag"


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a default only where there is one and the help text does not already say it."""

    def _get_help_string(self, action):
        if action.default in (None, False) or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pyvattn frag", description=__doc__, formatter_class=_Help)
    p.add_argument("--trace", default="arxiv",
                   help=f"a shipped trace ({', '.join(sorted(SHIPPED))}), {SYNTHETIC}:N[:SEED] "
                        f"(N generated requests), or a trace file (CSV or Mooncake JSONL)")
    p.add_argument("--model", default="llama-3-8b",
                   help=f"one of {', '.join(model_names())} (any case), or layers,kv_heads,head_dim[,dtype_bytes]")
    p.add_argument("--tp", type=positive_int, default=1, help="tensor-parallel degree")
    p.add_argument("--budget", default="40GiB", help="KV memory budget per GPU (e.g. 40GiB, 512MiB)")
    p.add_argument("--max-context", type=positive_int, default=None,
                   help="tokens one request may hold, what static reserves (default: the model's context length)")
    p.add_argument("--requests", type=positive_int, default=None,
                   help="the first N requests of the trace (default: all)")
    p.add_argument("--max-batch", type=positive_int, default=256, help="batch slots (vLLM's max_num_seqs)")
    p.add_argument("--watermark", type=fraction, default=0.01,
                   help="fraction of the budget kept free when admitting (vLLM v0's block watermark)")
    p.add_argument("--arrivals", choices=["order", "timestamps"], default="order",
                   help="queue everything at once (order), or arrive at the trace's timestamps")
    p.add_argument("--step-ms", type=positive_float, default=None,
                   help="decode step duration with --arrivals timestamps (default 30)")
    p.add_argument("--jobs", type=positive_int, default=None, help="worker processes (default: one per CPU)")
    p.add_argument("--measured", action="store_true",
                   help="also run every scheme on a real KVCache, scaled down, and check it against the simulation")
    p.add_argument("--measured-layers", type=positive_int, default=1, help="layers of the scaled measured run")
    p.add_argument("--measured-requests", type=positive_int, default=None,
                   help="requests of the scaled measured run (default: enough that the budget binds)")
    p.add_argument("--backend", default="host", help="KVCache backend of the measured run (host, cuda-vmm, uvm64k)")
    p.add_argument("--device", default="cpu", help="device of the measured run (cpu, cuda)")
    p.add_argument("--prefix-sharing", action="store_true",
                   help="compare prefill tokens saved, memory and concurrency with prefix sharing (block "
                        "sharing, page aliasing) on a trace with block hashes (Mooncake JSONL hash_ids)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT,
                   help="directory for the JSON and PNGs ($XDG_CACHE_HOME/pyvattn/frag by default)")
    p.add_argument("--no-plots", action="store_true", help="write no PNGs")
    return p


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(argv)
    except KeyboardInterrupt:  # the worker processes are stopped on the way out
        print("python -m pyvattn frag: interrupted", file=sys.stderr)
        return 130


def _main(argv: list[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.step_ms is not None and args.arrivals != "timestamps":
        parser.error("--step-ms applies only with --arrivals timestamps")
    if args.prefix_sharing:
        if args.measured:
            parser.error("--measured does not apply with --prefix-sharing (it simulates only)")
        from .prefix_report import main as prefix_main

        return prefix_main(args)
    from ..units import parse_size
    from .models import get_model
    from .report import Experiment, compare, markdown_table, plot, save_json, warnings
    from .schemes import DEFAULT_SCHEMES
    from .traces import load_trace

    try:
        model = get_model(args.model)
        budget = parse_size(args.budget, "--budget")
        trace = load_trace(args.trace, args.requests)
        step_s = (args.step_ms or 30.0) / 1000 if args.arrivals == "timestamps" else None
        exp = Experiment(trace, model, args.tp, budget, args.max_batch, step_s, args.max_context, args.watermark)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from . import compiled

    if compiled.numba is None and len(trace) > 10_000:
        print("note: numba is not installed: the Python serving loop runs, about 20x slower "
              "(pip install 'pyvattn[frag]')", file=sys.stderr)
    t0, cpu0 = time.perf_counter(), time.process_time()
    results = compare(exp, jobs=args.jobs)
    elapsed = time.perf_counter() - t0
    print(markdown_table(results, exp))
    for line in warnings(results, exp):  # also below the table; stderr for whoever only reads that
        print(f"warning: {line}", file=sys.stderr)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    trace_stem = trace.basename.rsplit('.', 1)[0] if trace.name not in SHIPPED else trace.name
    stem = re.sub(r"[^A-Za-z0-9.]+", "-", f"{trace_stem}-{model.name}-tp{args.tp}").strip("-").lower()
    measured = None
    if args.measured:
        from .measured import check_all

        measured = check_all(exp, DEFAULT_SCHEMES, results, args.measured_layers, args.measured_requests,
                             args.backend, args.device)
    save_json(out / f"{stem}.json", results, exp, measured, round(elapsed, 2))
    written = [out / f"{stem}.json"]
    if not args.no_plots:
        try:
            written += plot(out / stem, results, exp)
        except ImportError:  # matplotlib is the optional "plots" extra
            print("no plots: matplotlib is not installed (pip install 'pyvattn[plots]')", file=sys.stderr)
    print(f"simulated {len(results)} schemes x {len(trace)} requests in {elapsed:.1f} s "
          f"(this process: {time.process_time() - cpu0:.1f} s CPU); wrote " + ", ".join(map(str, written)))
    if not any(r.served for r in results):
        print("error: no scheme served any request (see the warnings)", file=sys.stderr)
        return 1
    if measured is not None and any(r["agree"] is False for r in measured):
        print("error: the measured run disagrees with the simulation (rows marked NO)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

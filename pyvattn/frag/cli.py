"""``python -m pyvattn frag``: compare KV allocation schemes on a request trace."""

from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

from ..units import parse_size
from .models import get_model
from .report import Experiment, compare, markdown_table, plot, save_json
from .schemes import DEFAULT_SCHEMES
from .traces import SHIPPED, load_trace


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pyvattn frag", description=__doc__)
    p.add_argument("--trace", default="arxiv", help=f"one of {sorted(SHIPPED)} or a trace file")
    p.add_argument("--model", default="llama-3-8b", help="model name or 'layers,kv_heads,head_dim[,dtype_bytes]'")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel degree")
    p.add_argument("--budget", default="40GiB", help="KV memory budget per GPU")
    p.add_argument("--requests", type=int, default=None, help="first N requests of the trace")
    p.add_argument("--max-batch", type=int, default=256)
    p.add_argument("--arrivals", choices=["order", "timestamps"], default="order",
                   help="queue everything at once (order), or arrive at trace timestamps")
    p.add_argument("--step-ms", type=float, default=30.0, help="decode step duration for --arrivals timestamps")
    p.add_argument("--measured", action="store_true",
                   help="also run every scheme on a real KVCache, scaled down, and check it against the simulation")
    p.add_argument("--measured-layers", type=int, default=1, help="layers of the scaled measured run")
    p.add_argument("--measured-requests", type=int, default=None,
                   help="requests of the scaled measured run (default: enough that the budget binds)")
    p.add_argument("--backend", default="host", help="KVCache backend of the measured run (host, cuda-vmm, uvm64k)")
    p.add_argument("--device", default="cpu", help="device of the measured run (cpu, cuda)")
    p.add_argument("--out", default="frag-results", help="directory for JSON and PNGs")
    p.add_argument("--no-plots", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        model = get_model(args.model)
        model.kv_heads_per_gpu(args.tp)
        exp = Experiment(args.trace, load_trace(args.trace, args.requests), model, args.tp,
                         parse_size(args.budget, "--budget"), args.max_batch,
                         args.step_ms / 1000 if args.arrivals == "timestamps" else None)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    results = compare(exp)
    elapsed = time.perf_counter() - t0
    print(markdown_table(results, exp))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = re.sub(r"[^A-Za-z0-9.]+", "-", f"{Path(args.trace).stem}-{model.name}-tp{args.tp}").strip("-").lower()
    measured = None
    if args.measured:
        from .measured import check_all

        measured = check_all(exp, DEFAULT_SCHEMES, results, args.measured_layers, args.measured_requests,
                             args.backend, args.device)
    save_json(out / f"{stem}.json", results, exp, measured)
    written = [out / f"{stem}.json"]
    if not args.no_plots:
        try:
            written += plot(out / stem, results, exp)
        except ImportError:  # matplotlib is the optional "plots" extra
            print("no plots: matplotlib is not installed (pip install 'pyvattn[plots]')", file=sys.stderr)
    print(f"simulated {len(results)} schemes in {elapsed:.1f} s; wrote " + ", ".join(map(str, written)))
    if measured is not None and any(r["agree"] is False for r in measured):
        print("error: the measured run disagrees with the simulation (rows marked NO)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Run the fragmentation comparison set for docs/fragmentation.md.

For each (trace, model, TP) below: simulate every scheme on the whole trace under a 40 GiB KV
budget per GPU, and write the markdown table, JSON and PNG plots under --out (default docs/frag),
then one summary table of the headline numbers of every run (summary.md). Each combination runs
in its own process, which itself simulates schemes in parallel (one worker per CPU).

    python scripts/frag_compare.py [--jobs 1] [--out docs/frag]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

RUNS = [(trace, model, tp) for trace in ("arxiv", "sharegpt", "azure-conv")
        for model, tp in (("llama-3-8b", 1), ("llama-3-8b", 2), ("yi-34b", 2))]
# schemes in the summary, with short column names
SUMMARY = [("static (max length)", "static"), ("paged 16-token blocks", "paged 16"),
           ("paged 256-token blocks", "paged 256"), ("vAttention 64KiB", "vAttn 64K"),
           ("vAttention 256KiB", "vAttn 256K"), ("vAttention 2MiB", "vAttn 2M"),
           ("vAttention 64KiB + deferred reclaim", "vAttn 64K + deferred")]


def one(trace: str, model: str, tp: int, out: Path, budget: str) -> tuple[str, float]:
    cmd = [sys.executable, "-m", "pyvattn", "frag", "--trace", trace, "--model", model, "--tp", str(tp),
           "--budget", budget, "--out", str(out)]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{r.stderr}")
    return r.stdout, time.perf_counter() - t0


def summary(out: Path) -> str:
    """Headline numbers of every run: waste at completion (mean), time-averaged waste, mean
    concurrency and requests served per step relative to paged 16-token blocks."""
    lines = []
    for metric, title, fmt in (
            ("waste_at_completion_mean", "Waste at completion (mean over requests)", "{:.2%}"),
            ("time_avg_waste_fraction", "Time-averaged waste (all allocated KV memory)", "{:.2%}"),
            ("mean_concurrent", "Mean requests in the batch", "{:.1f}"),
            ("requests_per_step", "Throughput proxy: requests served per step, relative to paged 16", "{:.2f}x")):
        lines += [f"#### {title}", "", "| trace | model | " + " | ".join(s for _, s in SUMMARY) + " |",
                  "|---|---|" + "---|" * len(SUMMARY)]
        for trace, model, tp in RUNS:
            path = out / f"{trace}-{model}-tp{tp}.json"
            if not path.exists():
                continue
            doc = json.loads(path.read_text())
            by = {r["scheme"]: r for r in doc["results"]}
            base = by["paged 16-token blocks"][metric] if metric == "requests_per_step" else 1
            cells = [fmt.format(by[name][metric] / base) for name, _ in SUMMARY]
            lines.append(f"| {trace} | {doc['model']['name']} TP{tp} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs", type=int, default=1, help="runs at once (each already uses every CPU)")
    ap.add_argument("--budget", default="40GiB")
    ap.add_argument("--out", default="docs/frag")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(args.jobs) as pool:
        futures = [pool.submit(one, t, m, tp, out, args.budget) for t, m, tp in RUNS]
        for (t, m, tp), f in zip(RUNS, futures):
            text, wall = f.result()
            table = text[: text.rfind("simulated")].strip()
            (out / f"{t}-{m}-tp{tp}.md").write_text(table + "\n")
            print(f"done: {t} {m} TP{tp} in {wall:.1f} s wall: {text.strip().splitlines()[-1]}", flush=True)
    (out / "summary.md").write_text(summary(out))
    print(f"wrote {out / 'summary.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

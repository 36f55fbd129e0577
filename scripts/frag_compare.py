#!/usr/bin/env python3
"""Run the fragmentation comparison set for docs/fragmentation.md.

For each (trace, model, TP) below: simulate every scheme on the whole trace under a 40 GiB KV
budget per GPU, with the context length given per trace (what a server would be configured for:
vLLM's --max-model-len), and write the markdown table, JSON and PNG plots under --out (default
docs/frag), then one summary of the headline numbers of every run (summary.md), with run times.
Runs go one after another; each simulates its schemes in parallel (one worker per CPU).

    python scripts/frag_compare.py [--out docs/frag]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

# trace -> context (tokens): arxiv's requests reach 33,756 tokens, so it runs at 32K (3 longer
# requests are rejected and flagged); the others at Llama-3-8B's own 8K.
CONTEXT = {"arxiv": 32768, "sharegpt": 8192, "azure-conv": 8192}
RUNS = [(trace, model, tp) for trace in CONTEXT
        for model, tp in (("llama-3-8b", 1), ("llama-3-8b", 2), ("yi-34b-200k", 2))]
# schemes in the summary, with short column names
SUMMARY = [("static (max length)", "static"), ("paged 16-token blocks", "paged 16"),
           ("paged 256-token blocks", "paged 256"), ("vAttention 64KiB", "vAttn 64K"),
           ("vAttention 256KiB", "vAttn 256K"), ("vAttention 2MiB", "vAttn 2M"),
           ("vAttention 64KiB + deferred reclaim", "vAttn 64K + deferred")]


def one(trace: str, model: str, tp: int, out: Path, budget: str) -> tuple[str, float, float]:
    cmd = [sys.executable, "-m", "pyvattn", "frag", "--trace", trace, "--model", model, "--tp", str(tp),
           "--budget", budget, "--max-context", str(CONTEXT[trace]), "--out", str(out)]
    t0, c0 = time.perf_counter(), os.times()
    r = subprocess.run(cmd, capture_output=True, text=True)
    c1 = os.times()
    if r.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{r.stderr}")
    cpu = (c1.children_user - c0.children_user) + (c1.children_system - c0.children_system)
    return r.stdout, time.perf_counter() - t0, cpu


def _cell(row: dict, metric: str, fmt: str, base: float) -> str:
    if not row["served"]:
        return "served nothing"
    metric, _, stat = metric.partition(".")
    value = row[metric][stat or "mean"] if isinstance(row[metric], dict) else row[metric]
    return fmt.format(value / base)


def summary(out: Path, times: dict) -> str:
    """Headline numbers of every run: waste at completion (mean; the part retained for reuse is
    shown separately), time-averaged fragmentation and retained memory, mean concurrency,
    preemptions and requests served per step relative to paged 16-token blocks."""
    lines = []
    tables = (("waste_at_completion", "Waste at completion (mean over served requests)", "{:.2%}"),
              ("waste_at_completion.p99", "Waste at completion, p99 over requests", "{:.1%}"),
              ("retained_at_completion", "... of which retained for reuse (reclaimable at once)", "{:.2%}"),
              ("time_avg_fragmentation_fraction", "Time-averaged internal fragmentation (of allocated memory)", "{:.2%}"),
              ("time_avg_retained_fraction", "Time-averaged memory retained for reuse (of allocated memory)", "{:.2%}"),
              ("mean_concurrent", "Mean requests in the batch", "{:.1f}"),
              ("preemptions", "Preemptions", "{:,.0f}"),
              ("requests_per_step", "Throughput proxy: requests served per step, relative to paged 16", "{:.2f}x"))
    for metric, title, fmt in tables:
        lines += [f"#### {title}", "", "| trace | model | " + " | ".join(s for _, s in SUMMARY) + " |",
                  "|---|---|" + "---|" * len(SUMMARY)]
        for trace, model, tp in RUNS:
            path = out / f"{trace}-{model}-tp{tp}.json"
            if not path.exists():
                continue
            doc = json.loads(path.read_text())
            by = {r["scheme"]: r for r in doc["results"]}
            base = by["paged 16-token blocks"][metric] if metric == "requests_per_step" else 1
            cells = [_cell(by[name], metric, fmt, base) for name, _ in SUMMARY]
            lines.append(f"| {trace} | {doc['model']['name']} TP{tp} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["#### Setup, rejections and run time", "",
              "| trace | model | requests | context | rejected (every scheme) | wall | CPU (all workers) |",
              "|---|---|---|---|---|---|---|"]
    for trace, model, tp in RUNS:
        path = out / f"{trace}-{model}-tp{tp}.json"
        if not path.exists():
            continue
        doc = json.loads(path.read_text())
        rejected = sorted({r["rejected"] for r in doc["results"]})
        wall, cpu = times.get((trace, model, tp), (None, None))
        lines.append(f"| {trace} | {doc['model']['name']} TP{tp} | {doc['requests']:,} | {doc['max_context']:,} | "
                     f"{', '.join(map(str, rejected))} | {wall:.1f} s | {cpu:.1f} s |" if wall is not None else
                     f"| {trace} | {doc['model']['name']} TP{tp} | {doc['requests']:,} | {doc['max_context']:,} | "
                     f"{', '.join(map(str, rejected))} | | |")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budget", default="40GiB")
    ap.add_argument("--out", default="docs/frag")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    times = {}
    for trace, model, tp in RUNS:
        text, wall, cpu = one(trace, model, tp, out, args.budget)
        times[(trace, model, tp)] = (wall, cpu)
        table = text[: text.rfind("simulated")].strip()
        (out / f"{trace}-{model}-tp{tp}.md").write_text(table + "\n")
        print(f"done: {trace} {model} TP{tp} in {wall:.1f} s wall, {cpu:.1f} s CPU", flush=True)
    (out / "summary.md").write_text(summary(out, times))
    print(f"wrote {out / 'summary.md'} (load average {os.getloadavg()[0]:.1f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Run the fragmentation comparison set for docs/fragmentation.md.

For each (trace, model, TP) below: simulate every scheme on the whole trace under a 40 GiB KV
budget per GPU, and write the markdown table, JSON and PNG plots under --out (default docs/frag).
Each combination runs in its own process (--jobs in parallel).

    python scripts/frag_compare.py [--jobs 2] [--out docs/frag]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

RUNS = [(trace, model, tp) for trace in ("arxiv", "sharegpt", "azure-conv")
        for model, tp in (("llama-3-8b", 1), ("llama-3-8b", 2), ("yi-34b", 2))]


def one(trace: str, model: str, tp: int, out: Path, budget: str) -> str:
    cmd = [sys.executable, "-m", "pyvattn", "frag", "--trace", trace, "--model", model, "--tp", str(tp),
           "--budget", budget, "--out", str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{r.stderr}")
    return r.stdout


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--budget", default="40GiB")
    ap.add_argument("--out", default="docs/frag")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(args.jobs) as pool:
        futures = [pool.submit(one, t, m, tp, out, args.budget) for t, m, tp in RUNS]
        for (t, m, tp), f in zip(RUNS, futures):
            text = f.result()
            table = text[: text.rfind("simulated")].strip()
            (out / f"{t}-{m}-tp{tp}.md").write_text(table + "\n")
            print(f"done: {t} {m} TP{tp}: {text.strip().splitlines()[-1]}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

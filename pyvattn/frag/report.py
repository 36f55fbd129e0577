"""Run a set of schemes on one trace and model, and report: markdown table, JSON, PNG plots."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..units import format_size
from .models import ModelConfig
from .schemes import DEFAULT_SCHEMES, CacheMemory, Scheme, UnitMemory
from .simulate import RunResult, serve
from .traces import Request


@dataclass
class Experiment:
    """One comparison: a trace, a model at a TP degree, a KV budget per GPU, a batch limit."""

    trace: str
    requests: list[Request]
    model: ModelConfig
    tp: int
    budget_bytes: int
    max_batch: int = 256
    arrival_step_seconds: float | None = None

    @property
    def max_len(self) -> int:
        return max(r.total_tokens for r in self.requests)

    def memory(self, scheme: Scheme) -> UnitMemory:
        tb = self.model.token_bytes(self.tp)
        return UnitMemory(scheme.unit_bytes(tb, self.max_len), tb, 2 * self.model.num_layers,
                          self.max_batch, self.max_len, self.budget_bytes, scheme.deferred_reclaim)

    def simulate(self, scheme: Scheme, progress: bool = False, on_step=None) -> RunResult:
        return serve(self.requests, self.memory(scheme), self.model.bytes_per_token(self.tp),
                     self.max_batch, scheme.name, self.arrival_step_seconds, progress, on_step)

    def measure(self, scheme: Scheme, backend: str = "host", device: str = "cpu",
                progress: bool = False, on_step=None) -> RunResult:
        """The same run on a real :class:`pyvattn.KVCache` (one page = one allocation unit)."""
        from ..kvcache import KVCache

        tb = self.model.token_bytes(self.tp)
        dtype = {1: torch.float8_e4m3fn, 2: torch.float16, 4: torch.float32}[self.model.dtype_bytes]
        cache = KVCache(self.model.num_layers, self.model.kv_heads_per_gpu(self.tp), self.model.head_dim,
                        self.max_batch, self.max_len, dtype=dtype, device=device, backend=backend,
                        page_size=scheme.unit_bytes(tb, self.max_len), memory_budget=self.budget_bytes,
                        deferred_reclaim=scheme.deferred_reclaim)
        memory = CacheMemory(cache)
        try:
            result = serve(self.requests, memory, self.model.bytes_per_token(self.tp), self.max_batch,
                           scheme.name + " (measured)", self.arrival_step_seconds, progress, on_step)
            stats = cache.stats()
            result.reclaimed_bytes = stats["reclaimed_pages_total"] * cache.page_size
            result.extra = {"backend": stats["backend"], "physical_bytes": stats["physical_bytes"],
                            "map_calls": stats["map_calls"], "map_seconds": stats["map_seconds"]}
            if hasattr(cache.backend, "allocated_bytes"):
                result.extra["os_allocated_bytes"] = cache.backend.allocated_bytes()
        finally:
            memory.close()
        return result


def markdown_table(results: list[RunResult], exp: Experiment) -> str:
    head = (f"{exp.trace}: {len(exp.requests)} requests, {exp.model.name} TP{exp.tp} "
            f"({format_size(exp.model.bytes_per_token(exp.tp))} of KV per token per GPU), "
            f"KV budget {format_size(exp.budget_bytes)} per GPU, max batch {exp.max_batch}\n\n")
    rows = ["| scheme | waste at completion (mean / p50 / p99) | time-avg waste | peak memory | "
            "concurrent (max / mean) | served per 1k steps | preemptions |",
            "|---|---|---|---|---|---|---|"]
    for r in results:
        s = r.summary()
        rows.append(
            f"| {r.scheme} | {s['waste_at_completion_mean']:.2%} / {s['waste_at_completion_p50']:.2%} / "
            f"{s['waste_at_completion_p99']:.2%} | {s['time_avg_waste_fraction']:.2%} | "
            f"{format_size(s['peak_allocated_bytes'])} | {s['max_concurrent']} / {s['mean_concurrent']:.1f} | "
            f"{1000 * s['requests_per_step']:.2f} | {s['preemptions']} |")
    return head + "\n".join(rows) + "\n"


def save_json(path: Path, results: list[RunResult], exp: Experiment, measured: list[dict] | None = None) -> None:
    """Write the run's setup and every scheme's summary (and the measured-mode rows, if any)."""
    doc = {"trace": exp.trace, "requests": len(exp.requests), "model": exp.model.__dict__, "tp": exp.tp,
           "budget_bytes": exp.budget_bytes, "max_batch": exp.max_batch,
           "results": [{**r.summary(), **({"measured": r.extra} if r.extra else {})} for r in results]}
    if measured is not None:
        doc["measured_vs_simulated"] = measured
    path.write_text(json.dumps(doc, indent=2) + "\n")


def plot(path_prefix: Path, results: list[RunResult], exp: Experiment) -> list[Path]:
    """Two PNGs: waste by scheme (bars), and concurrent requests over time (lines)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    title = (f"{exp.model.name} TP{exp.tp}, {exp.trace} ({len(exp.requests)} req), "
             f"budget {format_size(exp.budget_bytes)}")
    names = [r.scheme for r in results]
    summ = [r.summary() for r in results]
    y = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(9, 0.45 * len(names) + 1.6))
    for dy, key, label in ((-0.2, "waste_at_completion_mean", "at completion (mean over requests)"),
                           (0.2, "time_avg_waste_fraction", "time-averaged (all allocated memory)")):
        values = [100 * s[key] for s in summ]
        bars = ax.barh(y + dy, values, 0.4, label=label)
        ax.bar_label(bars, [f"{v:.2f}%" if v < 10 else f"{v:.0f}%" for v in values], fontsize=7, padding=2)
    ax.set_yticks(y, names)
    ax.invert_yaxis()
    ax.set_xscale("symlog", linthresh=1)
    ax.set_xlabel("KV memory wasted (% of allocated, log scale above 1%)")
    ax.set_xlim(0, 400)
    ax.set_title(title)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=2, fontsize=8)
    fig.tight_layout()
    waste_png = Path(f"{path_prefix}-waste.png")
    fig.savefig(waste_png, dpi=110)
    plt.close(fig)

    # concurrency (smoothed) next to completed requests: the second shows throughput, and static
    # (which runs far longer) would otherwise squeeze every other line against the left edge
    shown = [r for r in results if not r.scheme.endswith("deferred reclaim") or r.scheme.startswith("vAttention 64")]
    shown = [r for r in shown if r.scheme not in ("paged 32-token blocks", "vAttention 128KiB")]
    others = [r.steps for r in shown if not r.scheme.startswith("static")]
    xmax = 1.05 * max(others) if others else None
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(13, 4.8))
    for r in shown:
        style = "--" if r.scheme.startswith("paged") else ":" if r.scheme.startswith("static") else "-"
        window = max(1, int(xmax or r.steps) // 300)
        smooth = np.convolve(r.running, np.ones(window) / window, mode="valid")[::window]
        x = np.arange(len(smooth)) * window + window // 2
        label = r.scheme + (f" (runs to step {r.steps})" if xmax and r.steps > xmax else "")
        ax.plot(x, smooth, style, label=label, lw=1.2)
        done = np.sort(r.completion_step) if len(r.completion_step) else np.zeros(0)
        ax2.plot(np.append(done, r.steps), np.append(np.arange(1, len(done) + 1), len(done)), style, lw=1.2)
    ax.set_xlim(0, xmax)
    ax.set_xlabel("decode step")
    ax.set_ylabel("requests in the batch (mean over windows)")
    ax.set_title("concurrent requests")
    ax2.set_xlabel("decode step")
    ax2.set_ylabel("requests completed")
    ax2.set_title("completed requests (steeper = more throughput)")
    ax2.legend(*ax.get_legend_handles_labels(), fontsize=7, loc="lower right")  # the emptiest corner
    fig.suptitle(title)
    fig.tight_layout()
    conc_png = Path(f"{path_prefix}-concurrency.png")
    fig.savefig(conc_png, dpi=110)
    plt.close(fig)
    return [waste_png, conc_png]


def compare(exp: Experiment, schemes: tuple[Scheme, ...] = DEFAULT_SCHEMES, progress: bool = True,
            jobs: int | None = None) -> list[RunResult]:
    """Simulate every scheme on ``exp``, in ``schemes`` order; schemes are independent, so they run
    in ``jobs`` worker processes (default: one per CPU; 1 runs them here, in this process)."""
    from concurrent.futures import ProcessPoolExecutor

    from tqdm import tqdm

    jobs = min(len(schemes), jobs or os.cpu_count() or 1)
    bar = tqdm(total=len(schemes), desc=f"{exp.trace} {exp.model.name} TP{exp.tp}", unit="scheme",
               disable=not progress)
    if jobs == 1:
        results = []
        for s in schemes:
            results.append(exp.simulate(s))
            bar.update(1)
    else:
        # The slowest schemes (deferred reclaim reclaims on most steps; static runs ~3x the steps)
        # go first, so no worker is left with a long one at the end.
        slow_first = sorted(range(len(schemes)),
                            key=lambda i: (not schemes[i].deferred_reclaim, schemes[i].kind != "static"))
        with ProcessPoolExecutor(jobs) as pool:
            futures = {i: pool.submit(exp.simulate, schemes[i]) for i in slow_first}
            for f in futures.values():
                f.add_done_callback(lambda _: bar.update(1))
            results = [futures[i].result() for i in range(len(schemes))]
    bar.close()
    return results

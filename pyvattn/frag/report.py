"""Run a set of schemes on one trace and model, and report: markdown table, warnings, JSON, PNGs."""

from __future__ import annotations

import json
import os
import textwrap
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from ..units import format_size
from . import compiled
from .memory import CacheMemory, UnitMemory
from .models import ModelConfig
from .schemes import DEFAULT_SCHEMES, Scheme
from .simulate import REJECT_BUDGET, REJECT_CONTEXT, RunResult, ServePolicy, serve
from .traces import Trace


@dataclass
class Experiment:
    """One comparison: a trace, a model at a TP degree, a KV budget per GPU, and the serving
    policy (batch slots, context length, admission watermark, arrivals)."""

    trace: Trace
    model: ModelConfig
    tp: int
    budget_bytes: int
    max_batch: int = 256
    arrival_step_seconds: float | None = None
    max_context: int | None = None  # None: the model's
    watermark: float = 0.01

    def __post_init__(self):
        if not isinstance(self.trace, Trace):
            self.trace = Trace.from_requests("requests", self.trace)
        if self.max_context is None:
            self.max_context = self.model.max_context
        if self.max_context is None:
            raise ValueError(f"model {self.model.name!r} has no known context length: pass --max-context")
        if isinstance(self.budget_bytes, bool) or self.budget_bytes <= 0:
            raise ValueError(f"--budget={self.budget_bytes} must be > 0 bytes")
        self.model.kv_heads_per_gpu(self.tp)  # validates tp
        self.policy = ServePolicy(self.max_batch, self.max_context, self.watermark, self.arrival_step_seconds)
        if self.arrival_step_seconds is not None and self.trace.arrival_s is None:
            raise ValueError(f"trace {self.trace.name!r} has no arrival times: --arrivals timestamps needs them")

    @property
    def requests(self) -> Trace:
        return self.trace

    @property
    def max_len(self) -> int:
        """Tokens a slot can hold: the context length (what static reservation reserves)."""
        return self.max_context

    def unit_bytes(self, scheme: Scheme) -> int:
        """Bytes of one allocation unit of ``scheme`` in one region (one layer's K or V)."""
        return scheme.unit_bytes(self.model.token_bytes(self.tp), self.max_len)

    def memory(self, scheme: Scheme) -> UnitMemory:
        tb = self.model.token_bytes(self.tp)
        return UnitMemory(self.unit_bytes(scheme), tb, 2 * self.model.num_layers,
                          self.max_batch, self.max_len, self.budget_bytes, scheme.deferred_reclaim)

    def simulate(self, scheme: Scheme, progress=None, on_step=None, keep_series: bool = False) -> RunResult:
        return serve(self.trace, self.memory(scheme), self.model.bytes_per_token(self.tp), self.policy,
                     scheme.name, progress, on_step, keep_series)

    def measure(self, scheme: Scheme, backend: str = "host", device: str = "cpu",
                on_step=None, keep_series: bool = True) -> RunResult:
        """The same run on a real :class:`pyvattn.KVCache` (one page = one allocation unit)."""
        import torch

        from ..kvcache import KVCache

        tb = self.model.token_bytes(self.tp)
        dtype = {1: torch.float8_e4m3fn, 2: torch.float16, 4: torch.float32}[self.model.dtype_bytes]
        cache = KVCache(self.model.num_layers, self.model.kv_heads_per_gpu(self.tp), self.model.head_dim,
                        self.max_batch, self.max_len, dtype=dtype, device=device, backend=backend,
                        page_size=scheme.unit_bytes(tb, self.max_len), memory_budget=self.budget_bytes,
                        deferred_reclaim=scheme.deferred_reclaim)
        memory = CacheMemory(cache)
        try:
            result = serve(self.trace, memory, self.model.bytes_per_token(self.tp), self.policy,
                           scheme.name + " (measured)", None, on_step, keep_series)
            stats = cache.stats()
            result.reclaimed_bytes = stats["reclaimed_pages_total"] * cache.page_size
            result.extra = {"backend": stats["backend"], "physical_bytes": stats["physical_bytes"],
                            "map_calls": stats["map_calls"], "map_seconds": stats["map_seconds"]}
            if hasattr(cache.backend, "allocated_bytes"):
                result.extra["os_allocated_bytes"] = cache.backend.allocated_bytes()
        finally:
            memory.close()
        return result

    def describe(self) -> str:
        arrivals = ("all queued at the start" if self.arrival_step_seconds is None
                    else f"at trace timestamps, {1000 * self.arrival_step_seconds:g} ms per step")
        return (f"{self.trace.basename}: {len(self.trace)} requests, {self.model.name} TP{self.tp} "
                f"({format_size(self.model.bytes_per_token(self.tp))} of KV per token per GPU), "
                f"KV budget {format_size(self.budget_bytes)} per GPU, max batch {self.max_batch}, "
                f"context {self.max_context} tokens, admission watermark {self.watermark:.0%}, "
                f"arrivals {arrivals}")


def _pct(value: float | None) -> str:
    return "—" if value is None else f"{value:.2%}"


def markdown_table(results: list[RunResult], exp: Experiment) -> str:
    """The comparison as a markdown table, with its setup above and its warnings below."""
    rows = ["| scheme | served | rejected | preemptions (requests, recomputed tokens) | "
            "waste at completion: mean / p50 / p99 | of which retained (mean) | "
            "time-avg fragmentation | time-avg retained | peak memory | concurrent (max / mean) | "
            "served per 1k steps |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        s = r.summary()
        w, ret = s["waste_at_completion"], s["retained_at_completion"]
        if s["served"]:
            waste = f"{_pct(w['mean'])} / {_pct(w['p50'])} / {_pct(w['p99'])}"
            frag_t, ret_t = _pct(s["time_avg_fragmentation_fraction"]), _pct(s["time_avg_retained_fraction"])
        else:
            waste, frag_t, ret_t = "served nothing", "—", "—"
        rows.append(
            f"| {r.scheme} | {s['served']} | {s['rejected'] or 0}{' (!)' if s['rejected'] else ''} | "
            f"{s['preemptions']} ({s['requests_preempted']}, {s['recomputed_tokens']}) | {waste} | "
            f"{_pct(ret['mean'])} | {frag_t} | {ret_t} | {format_size(s['peak_allocated_bytes'])} | "
            f"{s['max_concurrent']} / {s['mean_concurrent']:.1f} | {1000 * s['requests_per_step']:.2f} |")
    text = exp.describe() + "\n\n" + "\n".join(rows) + "\n"
    notes = warnings(results, exp)
    return text + ("\n" + "\n".join(f"- warning: {w}" for w in notes) + "\n" if notes else "")


def warnings(results: list[RunResult], exp: Experiment) -> list[str]:
    """One line per group of schemes that rejected the same requests (or served nothing)."""
    groups: dict[tuple, list[RunResult]] = {}
    for r in results:
        if r.rejected_total:
            groups.setdefault((tuple(sorted(r.rejected.items())), bool(r.served)), []).append(r)
    lines = []
    for (reasons, served), members in groups.items():
        why = ", ".join(f"{n} {reason}" for reason, n in reasons if n)
        hint = []
        if dict(reasons).get(REJECT_CONTEXT):
            hint.append(f"--max-context (now {exp.max_context})")
        if dict(reasons).get(REJECT_BUDGET):
            hint.append(f"--budget (now {format_size(exp.budget_bytes)})")
        who = ("every scheme" if len(members) == len(results) > 1
               else ", ".join(r.scheme for r in members))
        lines.append(f"{who} rejected {members[0].rejected_total} of {len(exp.trace)} requests ({why})"
                     + (": the numbers cover the rest only" if served else ": served nothing")
                     + (f"; see {' and '.join(hint)}" if hint else ""))
    return lines


def save_json(path: Path, results: list[RunResult], exp: Experiment, measured: list[dict] | None = None,
              seconds: float | None = None) -> None:
    """Write the run's setup and every scheme's summary (and the measured-mode rows, if any)."""
    doc = {"trace": exp.trace.name, "requests": len(exp.trace), "model": exp.model.__dict__, "tp": exp.tp,
           "budget_bytes": exp.budget_bytes, "max_batch": exp.max_batch, "max_context": exp.max_context,
           "watermark": exp.watermark, "arrival_step_seconds": exp.arrival_step_seconds,
           "simulation_seconds": seconds, "warnings": warnings(results, exp),
           "results": [{**r.summary(), **({"measured": r.extra} if r.extra else {})} for r in results]}
    if measured is not None:
        doc["measured_vs_simulated"] = measured
    path.write_text(json.dumps(doc, indent=2) + "\n")


def _style(scheme: str) -> tuple[str, str]:
    """Line style and colour family by scheme kind (static dotted, paged dashed, vAttention solid)."""
    if scheme.startswith("static"):
        return ":", "black"
    return ("--", None) if scheme.startswith("paged") else ("-", None)


def plot(path_prefix: Path, results: list[RunResult], exp: Experiment) -> list[Path]:
    """Two PNGs: waste by scheme (fragmentation and retained, stacked, on a linear scale with
    each value printed, and the per-request p99), and requests in the batch and completed over
    time, every scheme."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    title = (f"{exp.trace.basename} ({len(exp.trace)} requests), {exp.model.name} TP{exp.tp}, "
             f"budget {format_size(exp.budget_bytes)}, context {exp.max_context}")
    summ = [r.summary() for r in results]
    names = [r.scheme + (f"  [{s['rejected']} rejected]" if s["rejected"] else "") for r, s in zip(results, summ)]
    y = np.arange(len(names))
    fig, axes = plt.subplots(1, 2, figsize=(13, 0.42 * len(names) + 2.2), sharey=True)
    panels = ((axes[0], "at completion\n(mean over served requests)", "fragmentation_at_completion",
               "retained_at_completion"),
              (axes[1], "time-averaged\n(all memory allocated over the run)", "time_avg_fragmentation_fraction",
               "time_avg_retained_fraction"))
    for ax, label, frag_key, ret_key in panels:
        frag = [100 * ((s[frag_key]["mean"] if isinstance(s[frag_key], dict) else s[frag_key]) or 0) for s in summ]
        ret = [100 * ((s[ret_key]["mean"] if isinstance(s[ret_key], dict) else s[ret_key]) or 0) for s in summ]
        ax.barh(y, frag, 0.7, color="tab:blue", label="internal fragmentation of running requests")
        ax.barh(y, ret, 0.7, left=frag, color="tab:orange", alpha=0.7,
                label="retained for reuse (reclaimable at once)")
        p99 = [100 * (s["waste_at_completion"]["p99"] or 0) if frag_key.endswith("completion") else 0 for s in summ]
        if any(p99):
            ax.plot(p99, y, "k|", markersize=11, mew=1.5, label="p99 over requests (waste)")
        top = max([max(f + r, p) for f, r, p in zip(frag, ret, p99)] + [1.0])
        for i, (f, r, p, s) in enumerate(zip(frag, ret, p99, summ)):
            text = "served nothing" if not s["served"] else (
                f"{f:.2f}%" if r < 0.005 else f"{f:.2f}% + {r:.2f}% retained") + (f", p99 {p:.1f}%" if p else "")
            ax.text(max(f + r, p) + top * 0.015, i, text, va="center", fontsize=7)
        ax.set_xlim(0, top * (1.9 if any(p99) else 1.5))  # room for the labels; no ticks past the data (or 100%)
        ax.set_xticks([t for t in ax.get_xticks() if 0 <= t <= min(100.0, top * 1.05)])
        ax.set_xlabel(f"% of allocated KV memory wasted, {label}")
        ax.grid(axis="x", alpha=0.3)
    axes[0].set_yticks(y, names)
    axes[0].invert_yaxis()
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=8, frameon=False)
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    waste_png = Path(f"{path_prefix}-waste.png")
    fig.savefig(waste_png, dpi=110)
    plt.close(fig)
    return [waste_png, _plot_over_time(path_prefix, results, title, plt)]


def _plot_over_time(path_prefix: Path, results: list[RunResult], title: str, plt) -> Path:
    """Requests in the batch and completed requests over time, every scheme. Static (or any scheme
    that runs far longer than the rest) would squeeze the others against the left edge, so the
    x-range ends where the slowest non-static scheme finishes, and longer runs say where they end."""
    dynamic = [r.steps for r in results if not r.scheme.startswith("static")]
    xmax = 1.05 * max(dynamic or [r.steps for r in results])
    cmap = plt.get_cmap("tab10")
    groups: list[list[RunResult]] = []  # runs with identical outcomes draw one line, named by all
    for r in results:
        curve = r.completions()
        same = next((g for g in groups if g[0].steps == r.steps
                     and all(np.array_equal(a, b) for a, b in zip(g[0].completions(), curve))), None)
        (same.append(r) if same else groups.append([r]))
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(14, 5.2))
    for i, group in enumerate(groups):
        r = group[0]
        style, colour = _style(r.scheme)
        colour = colour or cmap(i % 10)
        x, _, running = r.series.downsampled()
        per = max(1, len(x) // 250)  # about 250 points: the trend, not step-to-step noise
        cut = len(x) // per * per
        if cut:
            x, running = x[:cut:per], running[:cut].reshape(-1, per).mean(axis=1)
        label = " = ".join(g.scheme for g in group) + (f" (runs to step {r.steps:,})" if r.steps > xmax else "")
        if not r.served:
            label += " (served nothing)"
        ax.plot(x, running, style, color=colour, lw=1.2, label=label)
        ax2.plot(*r.completions(), style, color=colour, lw=1.2)
    for a in (ax, ax2):
        a.set_xlim(0, xmax)
        a.set_xlabel("decode step (thousands)")
        a.xaxis.set_major_formatter(lambda v, _: f"{v / 1000:g}")
        a.grid(alpha=0.3)
    ax.set_ylabel("requests in the batch (mean per window)")
    ax.set_title("concurrent requests")
    ax2.set_ylabel("requests completed")
    ax2.set_title("completed requests (steeper = more throughput)")
    handles, labels = ax.get_legend_handles_labels()
    fig.legend(handles, [textwrap.fill(t, 48) for t in labels], loc="center right", fontsize=7, frameon=False)
    fig.suptitle(title + "\n(schemes with identical runs share a line, named together)", fontsize=10)
    fig.tight_layout(rect=(0, 0, 0.72, 1))
    path = Path(f"{path_prefix}-concurrency.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _simulate(exp: Experiment, scheme: Scheme, progress) -> RunResult:
    return exp.simulate(scheme, progress=progress).compact()


def compare(exp: Experiment, schemes: tuple[Scheme, ...] = DEFAULT_SCHEMES, progress: bool = True,
            jobs: int | None = None) -> list[RunResult]:
    """Simulate every scheme on ``exp``, in ``schemes`` order; schemes are independent, so they run
    in ``jobs`` worker processes (default: one per CPU; 1 runs them here, in this process). One
    progress bar counts requests finished over all schemes, with an ETA."""
    from tqdm import tqdm

    from .workers import run_all

    # Schemes with the same unit and reclaim policy (a 64 KiB page that holds exactly 32 tokens
    # and a 32-token block) run identically: simulate each once.
    key = [(exp.unit_bytes(s), s.deferred_reclaim) for s in schemes]
    unique = [i for i, k in enumerate(key) if key.index(k) == i]
    jobs = min(len(unique), jobs or os.cpu_count() or 1)
    bar = tqdm(total=len(exp.trace) * len(unique), desc=f"{exp.trace.basename} {exp.model.name} TP{exp.tp}",
               unit="req", unit_scale=True, disable=not progress, smoothing=0.05)
    try:
        if compiled.enabled():  # compile (or load the cached build) once, before workers fork
            bar.set_postfix_str("compiling the simulator (once)")
            compiled.warm()
            bar.set_postfix_str("")
        # The slowest schemes (deferred reclaim reclaims on most steps; static runs the most
        # steps) go first, so no worker is left with a long one at the end.
        slow_first = sorted(unique, key=lambda i: (not schemes[i].deferred_reclaim, schemes[i].kind != "static"))
        done = run_all({i: (_simulate, (schemes[i],)) for i in slow_first}, jobs, bar.update, shared=(exp,))
        return [replace(done[key.index(k)], scheme=s.name) for s, k in zip(schemes, key)]
    finally:
        bar.close()

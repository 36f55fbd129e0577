"""``python -m pyvattn frag --prefix-sharing``: every scheme with and without prefix sharing on a
trace with block hashes; a markdown table, JSON and a PNG.

Schemes are those of :data:`~.schemes.DEFAULT_SCHEMES` without deferred reclaim (the prefix cache
retains finished requests' units in its place): static reservation (no sharing: a reservation is
one unit of the whole context, never full inside a prefix), paged blocks with block sharing,
vAttention pages with page aliasing. Each runs twice, with and without sharing, in the same loop
and budget, so that the difference is the sharing alone.
"""

from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path

from ..units import format_size
from .prefix import HASH_BLOCK_TOKENS, UnitKeys, unbounded_shared_tokens
from .prefix_sim import PrefixResult, serve_shared
from .report import Experiment, warnings
from .schemes import DEFAULT_SCHEMES, Scheme

PREFIX_SCHEMES: tuple[Scheme, ...] = tuple(s for s in DEFAULT_SCHEMES if not s.deferred_reclaim)
REFERENCE = "paged 16-token blocks"  # what "vs" columns compare with


def unit_keys(exp: Experiment, scheme: Scheme, sharing: bool = True) -> UnitKeys:
    """What ``scheme`` can share on ``exp`` (static: nothing)."""
    return UnitKeys(exp.unit_bytes(scheme), exp.model.token_bytes(exp.tp), sharing and scheme.kind != "static")


def simulate_prefix(exp: Experiment, chains, scheme: Scheme, sharing: bool = True, progress=None,
                    on_step=None) -> PrefixResult:
    """One scheme on ``exp`` (its trace's hash ``chains``), with or without sharing; the result's
    ``unbounded_tokens`` is what it would share with nothing evicted."""
    regions, unit, keys = 2 * exp.model.num_layers, exp.unit_bytes(scheme), unit_keys(exp, scheme, sharing)
    result = serve_shared(exp.trace, chains, keys, exp.budget_bytes // (unit * regions), exp.policy,
                          scheme.name, unit * regions, progress, on_step)
    result.unbounded_tokens = unbounded_shared_tokens(chains, exp.trace.prompt, keys)
    return result


def compare_prefix(exp: Experiment, chains, schemes: tuple[Scheme, ...] = PREFIX_SCHEMES, jobs: int | None = None,
                   progress: bool = True) -> list[tuple[PrefixResult, PrefixResult]]:
    """(with sharing, without) per scheme, in ``schemes`` order. Schemes with the same unit run
    once; runs go to ``jobs`` worker processes (1: in this process) under one progress bar."""
    import os
    from dataclasses import replace

    from tqdm import tqdm

    from .workers import run_all

    key = [(exp.unit_bytes(s), s.kind == "static") for s in schemes]
    # static shares nothing: its run without sharing stands for both
    runs = [(i, sharing) for i, k in enumerate(key) if key.index(k) == i for sharing in (True, False)
            if not (sharing and schemes[i].kind == "static")]
    jobs = min(len(runs), jobs or os.cpu_count() or 1)
    bar = tqdm(total=len(exp.trace) * len(runs), desc=f"prefix sharing {exp.trace.basename}", unit="req",
               unit_scale=True, disable=not progress, smoothing=0.05)
    try:
        done = run_all({run: (simulate_prefix, (schemes[run[0]], run[1])) for run in runs}, jobs, bar.update,
                       shared=(exp, chains))
    finally:
        bar.close()
    for i, _ in runs:
        done.setdefault((i, True), done[(i, False)])
    return [(replace(done[(key.index(k), True)], scheme=s.name), replace(done[(key.index(k), False)], scheme=s.name))
            for s, k in zip(schemes, key)]


def unit_tokens(exp: Experiment, scheme: Scheme) -> float:
    """Tokens one unit of ``scheme`` holds per region."""
    return exp.unit_bytes(scheme) / exp.model.token_bytes(exp.tp)


def hidden_loss_bound(exp: Experiment, scheme: Scheme, shared: PrefixResult,
                      reference_tokens: int = 16) -> float | None:
    """The most that the trace's 512-token resolution can hide of ``scheme``'s loss against
    ``reference_tokens``-token blocks, as a fraction of the prompt tokens it shared: if shared
    prefixes ended anywhere inside a 512-token block, a unit of G tokens (G dividing 512) leaves up
    to G - 1 of the shared tokens there unshared, the reference up to reference - 1: at most
    G - reference tokens per prompt with a hit (half that if the ends were uniform). None where G
    does not divide 512 (the loss is then already measured)."""
    g = unit_tokens(exp, scheme)
    if scheme.kind == "static" or g != int(g) or HASH_BLOCK_TOKENS % int(g) or not shared.saved_prompt_tokens:
        return None
    return max(0.0, (g - reference_tokens) * shared.prompts_with_hit / shared.saved_prompt_tokens)


def _gib(nbytes: float) -> str:
    return format_size(int(nbytes))


def markdown_table(pairs: list[tuple[PrefixResult, PrefixResult]], exp: Experiment) -> str:
    """One row per scheme: tokens saved, memory, concurrency, throughput (without -> with sharing)."""
    ref = next((w.summary() for w, _ in pairs if w.scheme == REFERENCE), None)
    rows = ["| scheme | tokens per unit | prompt tokens shared with earlier requests | vs paged 16 | "
            "hidden-loss bound vs paged 16 | unbounded cache | recomputation saved after preemption | "
            "memory in use: mean / peak | of which sharing saves (mean) | prefix cache (mean) | "
            "concurrent (mean), no sharing -> sharing | served per 1k steps, no sharing -> sharing | "
            "preemptions | evicted units |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    schemes = {s.name: s for s in PREFIX_SCHEMES}
    trace_prompt = max(1, int(exp.trace.prompt.sum()))  # the unbounded share counts every request
    for shared, alone in pairs:
        s, a = shared.summary(), alone.summary()
        scheme = schemes.get(shared.scheme)
        tokens = f"{unit_tokens(exp, scheme):g}" if scheme else "—"
        vs = (f"{s['saved_prompt_tokens'] / ref['saved_prompt_tokens'] - 1:+.2%}"
              if ref and ref["saved_prompt_tokens"] else "—")
        bound = hidden_loss_bound(exp, scheme, shared) if scheme else None
        rows.append(
            f"| {shared.scheme} | {tokens} | {s['saved_prompt_tokens']:,} ({s['saved_prompt_fraction']:.2%}) | "
            f"{vs} | {'—' if bound is None else f'{bound:.2%}'} | {s['unbounded_tokens'] / trace_prompt:.2%} | "
            f"{s['saved_recompute_tokens']:,} | "
            f"{_gib(s['mean_in_use_bytes'])} / {_gib(s['peak_in_use_bytes'])} | "
            f"{_gib(s['mean_shared_saving_bytes'])} | "
            f"{_gib(s['mean_cached_bytes'])} | {a['mean_concurrent']:.1f} -> {s['mean_concurrent']:.1f} | "
            f"{1000 * a['requests_per_step']:.2f} -> {1000 * s['requests_per_step']:.2f} | "
            f"{a['preemptions']} -> {s['preemptions']} | {s['evictions']:,} |")
    text = exp.describe() + f"; hash blocks of {HASH_BLOCK_TOKENS} tokens\n\n" + "\n".join(rows) + "\n"
    notes = warnings([w for w, _ in pairs], exp)
    return text + ("\n" + "\n".join(f"- warning: {w}" for w in notes) + "\n" if notes else "")


def save_json(path: Path, pairs: list[tuple[PrefixResult, PrefixResult]], exp: Experiment,
              seconds: float | None = None) -> None:
    schemes = {s.name: s for s in PREFIX_SCHEMES}
    doc = {"trace": exp.trace.name, "requests": len(exp.trace), "model": exp.model.__dict__, "tp": exp.tp,
           "budget_bytes": exp.budget_bytes, "max_batch": exp.max_batch, "max_context": exp.max_context,
           "watermark": exp.watermark, "arrival_step_seconds": exp.arrival_step_seconds,
           "hash_block_tokens": HASH_BLOCK_TOKENS, "simulation_seconds": seconds,
           "warnings": warnings([w for w, _ in pairs], exp),
           "results": [{"scheme": w.scheme, "unit_tokens": unit_tokens(exp, schemes[w.scheme]) if w.scheme in schemes
                        else None,
                        "hidden_loss_bound_vs_paged16": hidden_loss_bound(exp, schemes[w.scheme], w)
                        if w.scheme in schemes else None,
                        "sharing": w.summary(), "no_sharing": a.summary()} for w, a in pairs]}
    path.write_text(json.dumps(doc, indent=2) + "\n")


def plot(path: Path, pairs: list[tuple[PrefixResult, PrefixResult]], exp: Experiment) -> Path:
    """Three panels, one bar per scheme (values printed, so that small ones stay readable):
    prompt tokens shared, mean memory in use with and without sharing, mean concurrency with and
    without sharing."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    names = [w.scheme for w, _ in pairs]
    s = [w.summary() for w, _ in pairs]
    a = [x.summary() for _, x in pairs]
    y = np.arange(len(names))
    fig, axes = plt.subplots(1, 3, figsize=(15, 0.45 * len(names) + 2.8), sharey=True)
    gib = 2.0**30
    panels = (  # (axis, [(values, stacked on, colour, label)], x label, value format)
        (axes[0], [([100 * r["saved_prompt_fraction"] for r in s], None, "tab:green",
                    "prompt tokens found in the cache at first admission")],
         "% of prompt tokens shared with earlier requests", lambda v: f"{v:.2f}%"),
        (axes[1], [([r["mean_in_use_bytes"] / gib for r in a], None, "tab:gray", "without sharing"),
                   ([r["mean_in_use_bytes"] / gib for r in s], None, "tab:blue", "with sharing"),
                   ([r["mean_cached_bytes"] / gib for r in s], "with sharing", "lightsteelblue",
                    "+ prefix cache (unreferenced, evictable)")],
         "KV memory in use by running requests, mean (GiB)", lambda v: f"{v:.1f} GiB"),
        (axes[2], [([r["mean_concurrent"] for r in a], None, "tab:gray", "without sharing"),
                   ([r["mean_concurrent"] for r in s], None, "tab:blue", "with sharing")],
         "requests in the batch, mean", lambda v: f"{v:.1f}"),
    )
    for ax, series, xlabel, fmt in panels:
        rows = [label for _, under, _, label in series if under is None]
        height = 0.8 / len(rows)
        ends: dict[str, list[float]] = {}
        for values, under, colour, label in series:
            row = rows.index(under or label)
            offset = (row - (len(rows) - 1) / 2) * height
            left = ends.get(under, [0.0] * len(values))
            ax.barh(y + offset, values, height, left=left, color=colour, label=label)
            ends[under or label] = [lo + v for lo, v in zip(left, values)]
        top = max([max(v) for v in ends.values()] + [1e-9])
        for name, totals in ends.items():
            offset = (rows.index(name) - (len(rows) - 1) / 2) * height
            parts = [values for values, under, _, label in series if (under or label) == name]
            for i, total in enumerate(totals):
                text = " + ".join(fmt(p[i]) for p in parts) if len(parts) > 1 else fmt(total)
                ax.text(total + top * 0.01, i + offset, text, va="center", fontsize=7)
        ax.set_xlim(0, top * (1.6 if len(series) > 2 else 1.3))
        ax.set_xlabel(xlabel)
        ax.grid(axis="x", alpha=0.3)
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=2, frameon=False)
    axes[0].set_yticks(y, names)
    axes[0].invert_yaxis()
    fig.suptitle(f"prefix sharing: {exp.trace.basename} ({len(exp.trace)} requests), {exp.model.name} TP{exp.tp}, "
                 f"budget {format_size(exp.budget_bytes)}, {HASH_BLOCK_TOKENS}-token hash blocks", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def main(args) -> int:
    """The CLI's ``--prefix-sharing`` run, from its parsed ``args``; exit status."""
    from ..units import parse_size
    from .models import get_model
    from .prefix import load_hashed_trace

    try:
        model = get_model(args.model)
        budget = parse_size(args.budget, "--budget")
        trace, chains = load_hashed_trace(args.trace, args.requests)
        step_s = (args.step_ms or 30.0) / 1000 if args.arrivals == "timestamps" else None
        exp = Experiment(trace, model, args.tp, budget, args.max_batch, step_s, args.max_context, args.watermark)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    pairs = compare_prefix(exp, chains, jobs=args.jobs)
    elapsed = time.perf_counter() - t0
    print(markdown_table(pairs, exp))
    for line in warnings([w for w, _ in pairs], exp):
        print(f"warning: {line}", file=sys.stderr)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = re.sub(r"[^A-Za-z0-9.]+", "-", f"{trace.basename.rsplit('.', 1)[0]}-{model.name}-tp{args.tp}-prefix")
    stem = stem.strip("-").lower()
    save_json(out / f"{stem}.json", pairs, exp, round(elapsed, 2))
    written = [out / f"{stem}.json"]
    if not args.no_plots:
        try:
            written.append(plot(out / f"{stem}.png", pairs, exp))
        except ImportError:
            print("no plots: matplotlib is not installed (pip install 'pyvattn[plots]')", file=sys.stderr)
    print(f"simulated {len(pairs)} schemes x {len(trace)} requests, with and without sharing, in {elapsed:.1f} s; "
          f"wrote " + ", ".join(map(str, written)))
    if not any(w.served for w, _ in pairs):
        print("error: no scheme served any request (see the warnings)", file=sys.stderr)
        return 1
    return 0

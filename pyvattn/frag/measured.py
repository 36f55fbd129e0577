"""Measured mode: the same serving run on a real KVCache, checked against the simulation.

A real cache of the full experiment would need the full KV budget in host memory, so the run is
scaled down: fewer layers (the budget shrinks in proportion, so the same number of tokens fit)
and the first requests of the trace. Per-step allocated bytes, batch sizes and completions must
match the simulation exactly; the memory the OS really allocated (host backend: the memfd's
blocks) is reported beside them.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
from tqdm import tqdm

from ..units import format_size
from .report import Experiment
from .schemes import Scheme


def scaled(exp: Experiment, layers: int = 1, requests: int = 64) -> Experiment:
    """``exp`` with ``layers`` layers (budget scaled alike) and its first ``requests`` requests."""
    model = replace(exp.model, name=f"{exp.model.name} ({layers} of {exp.model.num_layers} layers)",
                    num_layers=layers)
    budget = exp.budget_bytes * layers // exp.model.num_layers
    return replace(exp, model=model, budget_bytes=budget, requests=exp.requests[:requests])


def check(exp: Experiment, scheme: Scheme, backend: str = "host", device: str = "cpu") -> dict:
    """Simulate and measure ``scheme`` on ``exp``; return the comparison."""
    sim = exp.simulate(scheme)
    os_peak = [0]

    def sample(step, memory):
        if hasattr(memory.cache.backend, "allocated_bytes"):
            os_peak[0] = max(os_peak[0], memory.cache.backend.allocated_bytes())

    real = exp.measure(scheme, backend, device, on_step=sample)
    same = (sim.steps == real.steps and np.array_equal(sim.allocated, real.allocated)
            and np.array_equal(sim.running, real.running) and np.array_equal(sim.used, real.used)
            and sim.served == real.served and sim.preemptions == real.preemptions)
    return {"scheme": scheme.name, "agree": bool(same), "steps": sim.steps, "served": real.served,
            "peak_allocated_simulated": int(sim.allocated.max()), "peak_mapped_measured": int(real.allocated.max()),
            "peak_os_allocated": os_peak[0], "backend": real.extra.get("backend"),
            "map_calls": real.extra.get("map_calls")}


def check_all(exp: Experiment, schemes, _results=None, layers: int = 1, requests: int = 64) -> bool:
    """Print a table of measured-vs-simulated for every scheme; True when all agree."""
    small = scaled(exp, layers, requests)
    tb = small.model.token_bytes(small.tp)
    rows = []
    for s in tqdm(schemes, desc="measured", unit="scheme"):
        if s.unit_bytes(tb, small.max_len) % 4096:
            rows.append({"scheme": s.name, "agree": None})  # host pages are whole OS pages
            continue
        rows.append(check(small, s))
    print(f"\nmeasured on a real KVCache: {small.model.name}, first {len(small.requests)} requests, "
          f"budget {format_size(small.budget_bytes)}\n")
    print("| scheme | steps | simulated peak | measured peak (mapped) | OS allocated (peak) | agree |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        if r["agree"] is None:
            print(f"| {r['scheme']} | - | - | - | - | skipped: unit not a multiple of 4 KiB |")
            continue
        print(f"| {r['scheme']} | {r['steps']} | {format_size(r['peak_allocated_simulated'])} | "
              f"{format_size(r['peak_mapped_measured'])} | {format_size(r['peak_os_allocated'])} | "
              f"{'yes' if r['agree'] else 'NO'} |")
    return all(r["agree"] in (True, None) for r in rows)

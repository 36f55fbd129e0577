"""Measured mode: the same serving run on a real KVCache, checked against the simulation.

A real cache of the full experiment would need the full KV budget in host memory, so the run is
scaled down: fewer layers (the budget shrinks in proportion, so the same number of tokens fit)
and the first requests of the trace, enough of them that the budget still binds (preemptions, and
reclaims with deferred reclaim). Every per-step series (allocated bytes, used bytes, batch size),
every request's allocation and step at completion, and the preemption count must match the
simulation exactly; the memory really allocated (host backend: the memfd's blocks; on a GPU: the drop in
free device memory reported by cuMemGetInfo; sampled every step) is reported beside them.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
from tqdm import tqdm

from ..units import format_size
from .report import Experiment
from .schemes import Scheme, on_os_pages


def scaled(exp: Experiment, layers: int = 1, requests: int = 64) -> Experiment:
    """``exp`` with ``layers`` layers (budget scaled alike) and its first ``requests`` requests."""
    if not 1 <= layers <= exp.model.num_layers:
        raise ValueError(f"layers={layers} must be in 1..{exp.model.num_layers}")
    if requests < 1:
        raise ValueError(f"requests={requests} must be >= 1")
    model = replace(exp.model, name=f"{exp.model.name} ({layers} of {exp.model.num_layers} layers)",
                    num_layers=layers)
    budget = exp.budget_bytes * layers // exp.model.num_layers
    return replace(exp, model=model, budget_bytes=budget, trace=exp.trace[:requests])


def requests_for_pressure(max_concurrent: int, available: int, cap: int = 600) -> int:
    """How many requests a scaled run takes so that the budget still binds: three batches' worth
    of what the full run kept in flight, at least 64, at most ``cap`` (run time) and ``available``."""
    return min(available, cap, max(64, 3 * max_concurrent))


def check(exp: Experiment, scheme: Scheme, backend: str = "host", device: str = "cpu") -> dict:
    """Simulate and measure ``scheme`` on ``exp``; return the comparison."""
    sim = exp.simulate(scheme, keep_series=True)
    os_peak = [0]
    on_gpu = device.startswith("cuda")
    if on_gpu:  # device memory in use by anyone, as cuMemGetInfo reports it; the peak rise is ours
        import torch

        free0 = torch.cuda.mem_get_info()[0]

    def sample(step, memory):
        if hasattr(memory.cache.backend, "allocated_bytes"):  # host: the memfd's allocated blocks
            os_peak[0] = max(os_peak[0], memory.cache.backend.allocated_bytes())
        elif on_gpu:
            os_peak[0] = max(os_peak[0], free0 - torch.cuda.mem_get_info()[0])

    real = exp.measure(scheme, backend, device, on_step=sample)
    sim_series, real_series = sim.series.full(), real.series.full()
    series = (sim.steps == real.steps and sim.served == real.served and sim.preemptions == real.preemptions
              and all(np.array_equal(sim_series[k], real_series[k]) for k in sim_series))
    same = (series and np.array_equal(sim.completion_alloc, real.completion_alloc)
            and np.array_equal(sim.completion_step, real.completion_step)
            # without deferred reclaim the cache counts every free as a reclaim; the model does not
            and (sim.reclaimed_bytes == real.reclaimed_bytes or not scheme.deferred_reclaim))
    return {"scheme": scheme.name, "agree": bool(same), "agree_series": bool(series),
            "steps": sim.steps, "served": real.served,
            "preemptions": real.preemptions, "reclaimed_bytes_measured": real.reclaimed_bytes,
            "reclaimed_bytes_simulated": sim.reclaimed_bytes,
            "peak_allocated_simulated": sim.series.peak_alloc, "peak_mapped_measured": real.series.peak_alloc,
            "peak_os_allocated": os_peak[0], "backend": real.extra.get("backend"),
            "map_calls": real.extra.get("map_calls"), "map_seconds": real.extra.get("map_seconds")}


def check_all(exp: Experiment, schemes, results=None, layers: int = 1, requests: int | None = None,
              backend: str = "host", device: str = "cpu") -> list[dict]:
    """Measure every scheme on a scaled copy of ``exp`` and print measured-vs-simulated as a
    markdown table; return the rows (``row["agree"]`` says whether that scheme matched exactly;
    None where the backend could not map the scheme's page size, with the reason in "skipped").
    Without ``requests``, the count comes from the full run's ``results`` (see
    :func:`requests_for_pressure`)."""
    if requests is None:
        peak = max((r.summary()["max_concurrent"] for r in results or []), default=21)
        requests = requests_for_pressure(peak, len(exp.requests))
    small = scaled(exp, layers, requests)
    tb = small.model.token_bytes(small.tp)
    rows = []
    for s in tqdm(schemes, desc="measured", unit="scheme"):
        paged = on_os_pages(s, tb, small.max_len) if s.kind == "static" else s
        try:
            rows.append(check(small, paged, backend, device))
        except ValueError as exc:  # a page the backend cannot map (see docs/fragmentation.md)
            size = format_size(paged.unit_bytes(tb, small.max_len))
            rows.append({"scheme": s.name, "agree": None,
                         "skipped": f"the {backend} backend cannot map its {size} pages ({exc})"})
    print(f"\nmeasured on a real KVCache ({backend} backend): "
          f"{small.model.name}, first {len(small.requests)} requests, budget {format_size(small.budget_bytes)}\n")
    print("| scheme | steps | preemptions | reclaimed (deferred) | simulated peak | measured peak (mapped) | "
          "OS allocated (peak) | agree |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        if r["agree"] is None:
            print(f"| {r['scheme']} | skipped: {r['skipped']} |||||||")
            continue
        print(f"| {r['scheme']} | {r['steps']} | {r['preemptions']} | {format_size(r['reclaimed_bytes_simulated'])} | "
              f"{format_size(r['peak_allocated_simulated'])} | {format_size(r['peak_mapped_measured'])} | "
              f"{format_size(r['peak_os_allocated'])} | {'yes' if r['agree'] else 'NO'} |")
    return rows

"""The serving loop under budget pressure gives the same results as before it was sped up.

tests/data/frag_pressure_regression.json holds every scheme's summary and digests of its
per-request arrays (completion step, bytes held, needed and used, preemptions), made by the
simulator of main at the commit it names, on settings with preemptions, deferred reclaim from
finished and active slots, and arrivals at timestamps (the paths tests/data/frag_regression.json,
made without budget pressure, does not reach). Regenerate (only for an intended change of
semantics): ``python tests/test_frag_pressure.py tests/data/frag_pressure_regression.json COMMIT``.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from pyvattn.frag.models import get_model
from pyvattn.frag.report import Experiment
from pyvattn.frag.schemes import DEFAULT_SCHEMES
from pyvattn.frag.traces import load_trace

DATA = Path(__file__).parent / "data" / "frag_pressure_regression.json"
ARRAYS = ("completion_step", "completion_alloc", "completion_needed", "completion_used", "preempted")


def digest(values) -> str:
    return hashlib.sha256(np.ascontiguousarray(np.asarray(values, dtype="<i8")).tobytes()).hexdigest()[:20]


def experiment(run: dict) -> Experiment:
    return Experiment(load_trace(run["trace"], run["requests"]), get_model(run["model"]), 1, run["budget_bytes"],
                      run["max_batch"], run["step_s"], run["max_context"], run["watermark"])


def outcomes(exp: Experiment) -> list[dict]:
    out = []
    for scheme in DEFAULT_SCHEMES:
        result = exp.simulate(scheme)
        out.append({"summary": result.summary(), "arrays": {k: digest(getattr(result, k)) for k in ARRAYS}})
    return out


def assert_same(got, ref, where: str) -> None:
    """Integers and strings exactly, floats to 1e-12 relative (numpy's percentile may round apart)."""
    if isinstance(ref, dict):
        assert got.keys() == ref.keys(), where
        for key in ref:
            assert_same(got[key], ref[key], f"{where}.{key}")
    elif isinstance(ref, float):
        assert got == pytest.approx(ref, rel=1e-12), where
    else:
        assert got == ref, where


@pytest.mark.parametrize("index", range(3))
def test_results_under_budget_pressure_unchanged(index):
    run = json.loads(DATA.read_text())["runs"][index]
    got = outcomes(experiment(run))
    assert sum(r["summary"]["preemptions"] for r in run["results"]) > 0 or run["step_s"] is not None
    for scheme, mine, ref in zip(DEFAULT_SCHEMES, got, run["results"]):
        assert_same(mine, ref, f"{run['trace']}: {scheme.name}")


CONFIGS = [
    {"trace": "azure-conv", "requests": 600, "model": "1,4,128", "budget_bytes": 12 << 20, "max_batch": 64,
     "max_context": 4096, "watermark": 0.01, "step_s": None},
    {"trace": "synthetic:600:2", "requests": None, "model": "llama-3-8b", "budget_bytes": 1 << 30, "max_batch": 64,
     "max_context": None, "watermark": 0.0, "step_s": None},
    {"trace": "azure-conv", "requests": 300, "model": "llama-3-8b", "budget_bytes": 2 << 30, "max_batch": 64,
     "max_context": None, "watermark": 0.01, "step_s": 0.001},
]

if __name__ == "__main__":
    path, commit = sys.argv[1], sys.argv[2]
    doc = {"about": f"full summaries and per-request array digests (sha256 of little-endian int64, 20 hex) "
                    f"from the simulator at commit {commit}, under budget pressure: preemptions, deferred "
                    f"reclaim from finished and active slots, arrivals at timestamps",
           "runs": [{**c, "results": outcomes(experiment(c))} for c in CONFIGS]}
    Path(path).write_text(json.dumps(doc, indent=1) + "\n")

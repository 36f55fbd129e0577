"""The compiled serving loop (numba) gives exactly the Python loop's results.

Random traces under budget pressure (preemptions, rejections at arrival, deferred reclaim from
finished and active slots, units of fractional tokens, arrivals at timestamps), every output
compared: per-request arrays, the summary, the plot series, the memory's books at the end.
tests/test_frag_pressure.py and tests/test_frag_sim.py hold the compiled loop (the default) to
results recorded before it existed.
"""

from __future__ import annotations

import os
from contextlib import contextmanager

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyvattn.frag import compiled
from pyvattn.frag.memory import UnitMemory
from pyvattn.frag.simulate import ServePolicy, SimulationStuck, serve
from pyvattn.frag.traces import Trace

pytestmark = pytest.mark.skipif(not compiled.enabled(), reason="numba is not installed (pip install 'pyvattn[frag]')")

ARRAYS = ("completion_step", "completion_alloc", "completion_needed", "completion_used", "preempted")


@contextmanager
def loop(which: str):
    old = os.environ.get("PYVATTN_FRAG_COMPILED")
    os.environ["PYVATTN_FRAG_COMPILED"] = "1" if which == "compiled" else "0"
    try:
        yield
    finally:
        if old is None:
            del os.environ["PYVATTN_FRAG_COMPILED"]
        else:
            os.environ["PYVATTN_FRAG_COMPILED"] = old


def run(which: str, trace: Trace, memory_args: tuple, policy: ServePolicy, progress=None):
    memory = UnitMemory(*memory_args)
    with loop(which):
        result = serve(trace, memory, 1000, policy, "s", progress=progress)
    return result, memory


def assert_identical(a, ma, b, mb) -> None:
    for name in ARRAYS:
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)
    assert a.summary() == b.summary()
    for x, y in zip(a.series.downsampled(), b.series.downsampled()):
        np.testing.assert_array_equal(x, y)
    np.testing.assert_array_equal(ma.units, mb.units)
    np.testing.assert_array_equal(ma.need, mb.need)
    np.testing.assert_array_equal(ma.active, mb.active)
    assert (ma.total_units, ma.needed_units, ma.reclaimed_units) == (mb.total_units, mb.needed_units,
                                                                     mb.reclaimed_units)


@st.composite
def cases(draw):
    n = draw(st.integers(1, 40))
    prompt = draw(st.lists(st.integers(1, 200), min_size=n, max_size=n))
    output = draw(st.lists(st.integers(1, 200), min_size=n, max_size=n))
    arrival = None
    if draw(st.booleans()):
        arrival = np.cumsum(draw(st.lists(st.floats(0, 2.0), min_size=n, max_size=n)))
    trace = Trace("random", prompt, output, arrival)
    token_bytes = draw(st.sampled_from([256, 512, 1000]))
    unit_bytes = draw(st.sampled_from([256, 1000, 1536, 4096, 16384]))  # 1 token per unit up to 64, fractional
    regions = draw(st.integers(1, 4))
    batch = draw(st.integers(1, 8))
    max_context = draw(st.integers(50, 500))
    budget_units = draw(st.one_of(st.none(), st.integers(1, 400)))
    budget = None if budget_units is None else budget_units * unit_bytes
    memory_args = (unit_bytes, token_bytes, regions, batch, max_context, budget, draw(st.booleans()))
    policy = ServePolicy(batch, max_context, draw(st.sampled_from([0.0, 0.01, 0.2])),
                         draw(st.sampled_from([0.5, 1.0])) if arrival is not None and draw(st.booleans()) else None)
    return trace, memory_args, policy


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases())
def test_compiled_loop_matches_python_loop(case):
    trace, memory_args, policy = case
    a, ma = run("python", trace, memory_args, policy)
    b, mb = run("compiled", trace, memory_args, policy)
    assert_identical(a, ma, b, mb)


def test_pressure_reaches_every_path():
    """One case by hand that preempts, rejects at arrival, and reclaims from active slots (the
    random cases reach these too; this one says so without a search)."""
    rng = np.random.default_rng(7)
    trace = Trace("pressure", rng.integers(1, 300, 400), rng.integers(1, 400, 400))
    args = (4096, 512, 2, 16, 500, 120 * 4096, True)
    policy = ServePolicy(16, 500, 0.0)
    a, ma = run("python", trace, args, policy)
    b, mb = run("compiled", trace, args, policy)
    assert_identical(a, ma, b, mb)
    assert b.preemptions > 50 and b.rejected_total > 0 and b.reclaimed_bytes > 0


def test_progress_counts_every_request_once():
    trace = Trace("p", np.full(5000, 30), np.full(5000, 20))
    seen = []
    result, _ = run("compiled", trace, (4096, 512, 2, 64, 100, None, False), ServePolicy(64, 100),
                    progress=seen.append)
    assert sum(seen) == 5000 == result.served
    assert len(seen) >= 5000 // 64  # as it goes (each completion of the 64 at once), not once at the end


@pytest.mark.parametrize("prompt, expected", [(100, "does not fit the memory alone"),  # grows out of it
                                                (400, "no request completed in the")])  # never admitted
def test_a_request_that_cannot_fit_alone_is_the_same_error(prompt, expected):
    """The admission rule keeps such requests out; forced in, both loops stop with one message."""
    from pyvattn.frag import simulate

    trace = Trace("big", [10, prompt], [5, 400])
    messages = []
    for which in ("python", "compiled"):
        memory = UnitMemory(4096, 512, 2, 4, 1000, 40 * 4096, False)
        with loop(which):
            server = simulate._Server(trace, memory, 1000, ServePolicy(4, 1000, 0.0), "s", None, None, False)
            server.never[:] = False
            with pytest.raises(SimulationStuck) as err:
                server.run()
        messages.append(str(err.value))
    assert messages[0] == messages[1]
    assert expected in messages[0]


def test_without_a_writable_cache_the_loop_still_compiles(monkeypatch):
    """numba refuses ``cache=True`` where neither the package nor the home directory is writable
    (a read-only container); the loop then compiles in each process instead of failing to import."""
    import importlib

    import numba

    njit = numba.njit

    def no_cache(*args, **kwargs):
        if kwargs.get("cache"):
            raise RuntimeError("cannot cache function: no locator available")
        return njit(*args, **kwargs)

    monkeypatch.setattr(numba, "njit", no_cache)
    try:
        module = importlib.reload(compiled)
        assert module._run._cache.__class__.__name__ == "NullCache"
    finally:
        monkeypatch.undo()
        importlib.reload(compiled)


def test_cli_says_when_numba_is_missing_on_a_large_trace(monkeypatch, capsys, tmp_path):
    """Without numba the Python loop runs; on a large trace the CLI says why it is slow (the run
    itself is cut short here: compare() is interrupted at once, which the CLI reports as Ctrl-C)."""
    import numba

    from pyvattn.frag import cli, report

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(compiled, "numba", None)
    monkeypatch.setattr(report, "compare", interrupted)
    assert cli.main(["--trace", "synthetic:20000", "--out", str(tmp_path)]) == 130
    err = capsys.readouterr().err
    assert "numba is not installed" in err and "pyvattn[frag]" in err
    assert err.strip().splitlines()[-1] == "python -m pyvattn frag: interrupted"
    monkeypatch.setattr(compiled, "numba", numba)
    assert cli.main(["--trace", "synthetic:20000", "--out", str(tmp_path)]) == 130
    assert "numba is not installed" not in capsys.readouterr().err

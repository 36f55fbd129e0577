"""Issue 13: no endless run, every rejection visible, static at the model's context, vLLM-style
admission, waste split into fragmentation and retained memory, every input error a one-line
file:line message with exit 2, a help that starts without torch, and the old numbers kept."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pyvattn.frag.cli import main as frag_main
from pyvattn.frag.models import ModelConfig, get_model
from pyvattn.frag.report import Experiment, markdown_table, warnings
from pyvattn.frag.memory import UnitMemory
from pyvattn.frag.schemes import DEFAULT_SCHEMES, Scheme
from pyvattn.frag.simulate import REJECT_BUDGET, REJECT_CONTEXT, SimulationStuck, serve
from pyvattn.frag.traces import Request, Trace, TraceError, load_trace

KiB = 1024
TINY = ModelConfig("tiny", num_layers=1, num_kv_heads=1, head_dim=128, max_context=4096)  # 512 B/token
PAGED16 = Scheme("paged", block_tokens=16)


def experiment(requests, budget=1 << 30, max_batch=8, **kw) -> Experiment:
    return Experiment(Trace.from_requests("t", requests), TINY, 1, budget, max_batch, **kw)


# --- no endless run -------------------------------------------------------------------------

SMALL_UNITS = (Scheme("static"), PAGED16, Scheme("paged", block_tokens=32), Scheme("vattn", page_bytes=4 * KiB),
               Scheme("vattn", page_bytes=4 * KiB, deferred_reclaim=True))


@pytest.mark.parametrize("scheme", SMALL_UNITS, ids=lambda s: s.name)
def test_a_request_whose_prompt_fits_but_total_never_does_is_rejected(scheme):
    # budget: 64 tokens (32 KiB); one request's prompt (40) fits but 40 + 60 never does. Before
    # issue 13 it was preempted, readmitted and regrown forever.
    exp = experiment([Request(10, 5), Request(40, 60), Request(8, 8)], budget=32 * KiB, max_context=64)
    r = exp.simulate(scheme)
    assert r.rejected[REJECT_CONTEXT] == 1  # 100 tokens > the 64-token context
    exp = experiment([Request(10, 5), Request(40, 60), Request(8, 8)], budget=32 * KiB, max_context=4096)
    r = exp.simulate(scheme)
    if scheme.kind == "static":  # a 4096-token reservation never fits 64 tokens of budget
        assert r.rejected[REJECT_BUDGET] == 3 and r.served == 0
    else:
        assert r.rejected[REJECT_BUDGET] == 1 and r.served == 2
        assert r.completion_step[1] == -1


def test_livelock_guard_stops_a_memory_model_that_lies():
    class Liar(UnitMemory):  # claims every request fits alone; it does not
        def need_units(self, lens):
            return 0 * lens

    exp = experiment([Request(40, 60)], budget=32 * KiB, max_context=4096)
    memory = exp.memory(PAGED16)
    memory.__class__ = Liar
    with pytest.raises(SimulationStuck, match="does not fit the memory alone"):
        serve(exp.trace, memory, 512, exp.policy, "liar")


@pytest.mark.parametrize("argv, message", [
    (["--max-batch", "0"], "--max-batch: 0 must be >= 1"),
    (["--max-batch", "-3"], "--max-batch: -3 must be >= 1"),
    (["--requests", "0"], "--requests: 0 must be >= 1"),
    (["--tp", "x"], "--tp: 'x' is not a whole number"),
    (["--step-ms", "0", "--arrivals", "timestamps"], "--step-ms: 0 must be > 0"),
    (["--step-ms", "nan", "--arrivals", "timestamps"], "--step-ms: nan is not a finite number"),
    (["--step-ms", "30"], "--step-ms applies only with --arrivals timestamps"),
    (["--watermark", "1"], "--watermark: 1 must lie in [0, 1)"),
    (["--max-context", "0"], "--max-context: 0 must be >= 1"),
    (["--budget", "0"], "--budget=0 must be > 0 bytes"),
    (["--arrivals", "timestamps", "--trace", "sharegpt"], "trace 'sharegpt' has no arrival times"),
    (["--model", "gpt-17"], "--model='gpt-17' is neither one of"),
    (["--model", "32,8,128"], "has no known context length: pass --max-context"),
    (["--tp", "3"], "--tp=3 does not divide"),
    (["--trace", "synthetic:x"], "write 'synthetic:N'"),
])
def test_every_option_is_validated_with_exit_2(argv, message, capsys, tmp_path):
    try:
        code = frag_main(argv + ["--out", str(tmp_path)])
    except SystemExit as exc:  # argparse's own errors
        code = exc.code
    assert code == 2
    err = capsys.readouterr().err
    assert message in err
    assert "Traceback" not in err and len(err.strip().splitlines()[-1]) < 300


# --- every input error: one line naming file:line, exit 2 -----------------------------------

@pytest.mark.parametrize("name, text, message", [
    ("neg.jsonl", '{"input_length": 5, "output_length": 1}\n{"input_length": -5, "output_length": 1}\n',
     "neg.jsonl:2: input_length=-5 is not a whole token count >= 0"),
    ("frac.jsonl", '{"input_length": 12.7, "output_length": 1}\n', "frac.jsonl:1: input_length=12.7 is not a whole"),
    ("bool.jsonl", '{"input_length": true, "output_length": 1}\n', "bool.jsonl:1: input_length=True is not a number"),
    ("inf.jsonl", '{"input_length": Infinity, "output_length": 1}\n', "inf.jsonl:1: input_length='Infinity' is not a whole token count >= 0"),
    ("nan.jsonl", '{"input_length": 1, "output_length": NaN}\n', "nan.jsonl:1: output_length='NaN' is not a whole token count >= 0"),
    ("str.jsonl", '{"input_length": "7", "output_length": 1}\n', None),  # "7" is a count, as in a CSV
    ("big.jsonl", '{"input_length": 1e400, "output_length": 1}\n', "big.jsonl:1: input_length=inf is not a whole"),
    ("notjson.jsonl", '{"input_length": 1,\n', "notjson.jsonl:1: not JSON"),
    ("fields.jsonl", '{"prompt": 1}\n', "fields.jsonl:1: not a Mooncake record"),
    ("stamp.jsonl", '{"timestamp": 1, "input_length": 1, "output_length": 1}\n'
                    '{"timestamp": NaN, "input_length": 1, "output_length": 1}\n',
     "stamp.jsonl:2: timestamp='NaN' is not a finite number of milliseconds"),
    ("halfstamp.jsonl", '{"timestamp": 1, "input_length": 1, "output_length": 1}\n'
                        '{"input_length": 1, "output_length": 1}\n', "halfstamp.jsonl:2: timestamp must be on every record"),
    ("inf.csv", "prompt_tokens,output_tokens\n5,6\ninf,6\n", "inf.csv:3: prompt_tokens='inf' is not a whole"),
    ("nan.csv", "prompt_tokens,output_tokens\nnan,6\n", "nan.csv:2: prompt_tokens='nan' is not a whole"),
    ("neg.csv", "prompt_tokens,output_tokens\n5,-6\n", "neg.csv:2: output_tokens='-6' is not a whole"),
    ("short.csv", "prompt_tokens,output_tokens\n5,6\n7\n", "short.csv:3: 1 fields, the header has 2"),
    ("text.csv", "prompt_tokens,output_tokens\nfive,6\n", "text.csv:2: prompt_tokens='five' is not a number"),
    ("arrived.csv", "arrived_at,num_prefill_tokens,num_decode_tokens\n0.5,1,1\nsoon,1,1\n",
     "arrived.csv:3: arrived_at='soon' is not a number of s"),
    ("arrinf.csv", "arrived_at,num_prefill_tokens,num_decode_tokens\ninf,1,1\n", "arrinf.csv:2: arrived_at='inf' is not a finite"),
    ("noarr.csv", "arrived_at,num_prefill_tokens,num_decode_tokens\n1,1,1\n,1,1\n", "noarr.csv:3: arrived_at is empty"),
    ("cols.csv", "a,b\n1,2\n", "cols.csv:1: columns ['a', 'b'] name no prompt and output"),
])
def test_bad_trace_values_name_file_and_line(tmp_path, capsys, name, text, message):
    path = tmp_path / name
    path.write_text(text)
    if message is None:
        assert list(load_trace(path)) == [Request(7, 1)]
        return
    with pytest.raises(TraceError) as exc:
        load_trace(path)
    assert str(exc.value).startswith(str(path)) and message in str(exc.value)
    assert frag_main(["--trace", str(path), "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and message in err


def test_non_utf8_trace_names_its_file(tmp_path, capsys):
    path = tmp_path / "latin1.csv"
    path.write_bytes("prompt_tokens,output_tokens\n5,6\n# caf\xe9\n".encode("latin-1"))
    assert frag_main(["--trace", str(path), "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: {path}:3: not UTF-8 text (invalid continuation byte at byte 5 of the line)"


# --- rejections are visible; a scheme that served nothing cannot look best --------------------

def test_a_scheme_that_served_nothing_says_so(capsys):
    # 64 tokens of budget: static reserves the 4096-token context and serves nothing
    exp = experiment([Request(10, 5)] * 3, budget=32 * KiB)
    results = [exp.simulate(Scheme("static")), exp.simulate(PAGED16)]
    table = markdown_table(results, exp)
    static_row = next(line for line in table.splitlines() if line.startswith("| static"))
    assert "served nothing" in static_row and "3 (!)" in static_row and "0.00%" not in static_row
    assert warnings(results, exp) == [
        "static (max length) rejected 3 of 3 requests (3 cannot complete within the budget): served nothing; "
        "see --budget (now 32 KiB)"]
    assert results[0].summary()["waste_at_completion"]["mean"] is None  # not 0.0


def test_cli_exits_1_when_no_scheme_served_anything(tmp_path, capsys):
    trace = tmp_path / "one.csv"
    trace.write_text("prompt_tokens,output_tokens\n9000,10\n")
    assert frag_main(["--trace", str(trace), "--out", str(tmp_path), "--jobs", "1"]) == 1
    err = capsys.readouterr().err
    assert "every scheme rejected 1 of 1 requests (1 longer than the context)" in err
    assert "no scheme served any request" in err


# --- static at the model's context ------------------------------------------------------------

def test_static_reserves_the_models_context_not_the_longest_request():
    exp = Experiment(load_trace("azure-conv", 400), get_model("llama-3-8b"), 1, 40 << 30, 256)
    assert exp.max_context == 8192
    r = exp.simulate(Scheme("static"))
    assert set(r.completion_alloc[r.completion_step >= 0].tolist()) == {8192 * 128 * KiB}  # 1 GiB each
    longer = int((exp.trace.total > 8192).sum())
    assert r.rejected[REJECT_CONTEXT] == longer
    override = Experiment(load_trace("azure-conv", 400), get_model("llama-3-8b"), 1, 40 << 30, 256, max_context=16384)
    assert override.simulate(Scheme("static")).completion_alloc.max() == 16384 * 128 * KiB


# --- admission as vLLM does it ----------------------------------------------------------------

class Spy(UnitMemory):
    """Logs grow results, frees and allocs, so a test can see what happened within a step."""

    def grow(self, slots, lens):
        ok = super().grow(slots, lens)
        self.log.append(("grow", ok))
        return ok

    def free(self, slot):
        self.log.append(("free", None))
        super().free(slot)

    def alloc(self, length):
        self.log.append(("alloc", None))
        return super().alloc(length)


@pytest.mark.parametrize("scheme", [PAGED16, Scheme("vattn", page_bytes=64 * KiB, deferred_reclaim=True)],
                         ids=lambda s: s.name)
@pytest.mark.parametrize("watermark", [0.0, 0.01])
def test_no_admission_in_a_step_that_preempted(scheme, watermark):
    exp = Experiment(load_trace("azure-conv", 300), get_model("1,4,128"), 1, 12 << 20, 64,
                     max_context=4096, watermark=watermark)
    memory = exp.memory(scheme)
    memory.__class__, memory.log = Spy, []
    r = serve(exp.trace, memory, 1024, exp.policy, scheme.name,
              on_step=lambda step, m: m.log.append(("step", None)))
    assert r.preemptions > 0
    preempted = False
    for event, ok in memory.log:
        if event == "step":
            preempted = False
        elif event == "grow" and ok is False:
            preempted = True
        elif event == "alloc":
            assert not preempted, "a request was admitted in a step that preempted"


def test_watermark_lowers_preemptions_and_is_reported():
    exp = lambda w: Experiment(load_trace("sharegpt", 3000), get_model("llama-3-8b"), 1, 4 << 30, 256, watermark=w)
    none, vllm = exp(0.0).simulate(PAGED16), exp(0.05).simulate(PAGED16)
    assert vllm.preemptions < none.preemptions
    assert vllm.served == none.served == 3000
    s = vllm.summary()
    assert s["recomputed_tokens"] == vllm.recomputed_tokens > 0
    assert s["max_preemptions_per_request"] == int(vllm.preempted.max()) >= 1


# --- the old numbers, where issue 13 kept the semantics ----------------------------------------

def test_results_unchanged_where_the_semantics_are():
    doc = json.loads((Path(__file__).parent / "data" / "frag_regression.json").read_text())
    for run in doc["runs"]:
        exp = Experiment(load_trace(run["trace"], run["requests"]), get_model(run["model"]), run["tp"],
                         run["budget_bytes"], run["max_batch"], max_context=run["max_context"])
        for scheme, ref in zip(DEFAULT_SCHEMES, run["results"]):
            s = exp.simulate(scheme).summary()
            assert s["scheme"] == ref["scheme"]
            for key in ("steps", "served", "peak_allocated_bytes", "max_concurrent"):
                assert s[key] == ref[key], (scheme.name, key)
            for stat in ("mean", "p50", "p99"):
                assert s["waste_at_completion"][stat] == pytest.approx(ref[f"waste_at_completion_{stat}"], rel=1e-12)
            for key in ("waste_at_completion_aggregate", "time_avg_waste_fraction", "mean_concurrent"):
                assert s[key] == pytest.approx(ref[key], rel=1e-12), (scheme.name, key)


# --- command line -----------------------------------------------------------------------------

def test_help_lists_defaults_models_and_traces_without_importing_torch():
    code = ("import sys, contextlib, io\n"
            "from pyvattn.__main__ import main\n"
            "buf = io.StringIO()\n"
            "with contextlib.redirect_stdout(buf):\n"
            "    try: main(['frag', '--help'])\n"
            "    except SystemExit: pass\n"
            "print(buf.getvalue())\n"
            "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().endswith("NO-TORCH")
    for text in ("Llama-3-8B", "Yi-34B-200K", "azure-conv", "mooncake", "synthetic:N", "(default: 40GiB)",
                 "(default: 256)", "--max-context", "--watermark"):
        assert text in out, text
    assert "``" not in out and "**" not in out


def test_synthetic_traces_are_seeded():
    a, b, c = load_trace("synthetic:500"), load_trace("synthetic:500:0"), load_trace("synthetic:500:1")
    assert np.array_equal(a.prompt, b.prompt) and not np.array_equal(a.prompt, c.prompt)
    assert len(a) == 500 and a.arrival_s is not None and (a.total <= 8000).all()


def test_progress_counts_requests(tmp_path):
    seen = []
    exp = Experiment(load_trace("azure-conv", 2000), get_model("llama-3-8b"), 1, 4 << 30, 256)
    exp.simulate(PAGED16, progress=seen.append)
    assert sum(seen) == 2000 and len(seen) > 10  # many small updates, not one per scheme


def test_outputs_go_to_the_user_cache_directory_by_default(tmp_path):
    env = {**__import__("os").environ, "XDG_CACHE_HOME": str(tmp_path)}
    subprocess.run([sys.executable, "-m", "pyvattn", "frag", "--trace", "azure-conv", "--requests", "50",
                    "--no-plots", "--jobs", "1"], env=env, capture_output=True, check=True, cwd=tmp_path)
    assert [p.name for p in (tmp_path / "pyvattn" / "frag").iterdir()] == ["azure-conv-llama-3-8b-tp1.json"]


def test_no_plots_without_matplotlib(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    assert frag_main(["--trace", "azure-conv", "--requests", "50", "--out", str(tmp_path), "--jobs", "1"]) == 0
    assert "no plots: matplotlib is not installed" in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir()] == ["azure-conv-llama-3-8b-tp1.json"]

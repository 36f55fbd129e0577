"""Fragmentation comparison: traces, hand-computed waste, simulation vs a real KVCache."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pyvattn.frag.cli import main as frag_main
from pyvattn.frag.measured import check, on_os_pages, scaled
from pyvattn.frag.models import ModelConfig, get_model
from pyvattn.frag.report import Experiment
from pyvattn.frag.schemes import DEFAULT_SCHEMES, Scheme
from pyvattn.frag.traces import Request, Trace, load_trace

KiB = 1024
# 1 layer, 1 KV head of 128 fp16 values: 256 B per token per region, 512 B per token (K+V)
TINY = ModelConfig("tiny", num_layers=1, num_kv_heads=1, head_dim=128)


def run(requests, scheme, budget=1 << 30, max_batch=8, max_context=100, watermark=0.0):
    exp = Experiment(Trace.from_requests("synthetic", requests), TINY, 1, budget, max_batch,
                     max_context=max_context, watermark=watermark)
    return exp.simulate(scheme, keep_series=True)


@pytest.mark.parametrize("scheme,alloc_tokens", [
    (Scheme("static"), 100),                      # reserves the context (100)
    (Scheme("paged", block_tokens=16), 64),       # ceil(50/16)=4 blocks of 16
    (Scheme("paged", block_tokens=256), 256),
    (Scheme("vattn", page_bytes=4 * KiB), 64),    # 4 KiB / 256 B = 16 tokens per page
    (Scheme("vattn", page_bytes=64 * KiB), 256),  # 256 tokens per page
])
def test_waste_at_completion_matches_hand_computed(scheme, alloc_tokens):
    # one request of 40+10 = 50 tokens, and a longer one
    r = run([Request(40, 10), Request(90, 10)], scheme, max_batch=1)
    assert r.completion_alloc[0] == r.completion_needed[0] == alloc_tokens * 512
    assert r.completion_used[0] == 50 * 512
    assert 1 - r.completion_used[0] / r.completion_alloc[0] == pytest.approx(1 - 50 / alloc_tokens)
    assert r.served == 2 and r.preemptions == 0 and r.rejected_total == 0


def test_time_series_and_time_averaged_waste_by_hand():
    # paged 16: one request 10 + 20 tokens alone; steps: length 10 (admit), 11, ..., 30
    r = run([Request(10, 20)], Scheme("paged", block_tokens=16))
    lens = np.arange(10, 31)
    series = r.series.full()
    assert r.steps == len(lens)
    assert np.array_equal(series["used"], lens * 512)
    assert np.array_equal(series["allocated"], -(-lens // 16) * 16 * 512)
    assert np.array_equal(series["running"], np.ones(len(lens)))
    assert not series["retained"].any()
    expected = ((-(-lens // 16) * 16 - lens) * 512).sum() / (-(-lens // 16) * 16 * 512).sum()
    s = r.summary()
    assert s["time_avg_waste_fraction"] == pytest.approx(expected)
    assert s["time_avg_fragmentation_fraction"] == pytest.approx(expected) and s["time_avg_retained_fraction"] == 0


def test_budget_limits_concurrency_and_static_fits_fewest():
    reqs = [Request(100, 28)] * 12  # 128 tokens each; context 128
    budget = 8 * 128 * 512  # room for exactly 8 requests at full length
    static = run(reqs, Scheme("static"), budget=budget, max_batch=16, max_context=128)
    paged = run(reqs, Scheme("paged", block_tokens=16), budget=budget, max_batch=16, max_context=128)
    assert static.summary()["max_concurrent"] == 8
    assert paged.summary()["max_concurrent"] >= 8
    assert static.served == paged.served == 12
    assert static.preemptions == 0
    assert static.summary()["peak_allocated_bytes"] <= budget
    assert paged.summary()["peak_allocated_bytes"] <= budget


def test_preemption_when_growth_does_not_fit():
    # two requests admitted with 64-token prompts fill the 2 x 64-token budget; growth must preempt
    r = run([Request(64, 32), Request(64, 32)], Scheme("paged", block_tokens=16), budget=128 * 512)
    assert r.preemptions >= 1 and r.served == 2
    assert r.summary()["peak_allocated_bytes"] <= 128 * 512
    # recompute preemption keeps the generated tokens: the victim is refilled with all it had
    assert r.recomputed_tokens >= 64 and r.preempted.tolist() == [0, r.preemptions]


def test_deferred_reclaim_keeps_pages_for_the_next_request():
    reqs = [Request(60, 4), Request(30, 4)]
    plain = run(reqs, Scheme("vattn", page_bytes=4 * KiB), max_batch=1)
    kept = run(reqs, Scheme("vattn", page_bytes=4 * KiB, deferred_reclaim=True), max_batch=1)
    # the second request reuses the first one's 4 pages (64 tokens) instead of mapping 3
    assert plain.completion_alloc.tolist() == [64 * 512, 48 * 512]
    assert kept.completion_alloc.tolist() == [64 * 512, 64 * 512]
    assert kept.series.full()["allocated"][-1] == 64 * 512  # still mapped after everything finished
    # ... and what the second (34 tokens: 3 pages) holds beyond its need counts as retained
    # (reclaimable at once), not as fragmentation
    assert kept.series.full()["retained"][-1] == (64 - 48) * 512
    assert kept.completion_needed.tolist() == [64 * 512, 48 * 512]  # what the second one's length needs
    assert kept.summary()["retained_at_completion"]["mean"] == pytest.approx((1 - 48 / 64) / 2)


@pytest.mark.parametrize("scheme", DEFAULT_SCHEMES, ids=lambda s: s.name)
def test_measured_on_host_kvcache_agrees_exactly_with_simulation(scheme):
    exp = Experiment(load_trace("arxiv", 40), get_model("llama-3-8b"), 2, 6 << 30, 16, max_context=32768)
    small = scaled(exp, layers=1, requests=24)
    if scheme.kind == "static":  # one page of max_len tokens per request (20.8 MiB here)
        scheme = on_os_pages(scheme, small.model.token_bytes(small.tp), small.max_len)
    assert len(small.trace) == 24
    result = check(small, scheme)
    assert result["agree"], result  # every series, and each request's allocation at completion
    assert result["backend"] == "host"
    assert result["peak_mapped_measured"] <= small.budget_bytes
    assert result["peak_os_allocated"] >= result["peak_mapped_measured"]  # memory really held


def test_traces_load_every_format(tmp_path):
    sarathi = tmp_path / "s.csv"
    sarathi.write_text("num_prefill_tokens,num_decode_tokens,num_total_tokens,pd_ratio\n7564.0,192.0,7756.0,39.4\n")
    azure = tmp_path / "a.csv"
    azure.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:17:03.9799600,4808,10\n"
                     "2023-11-16 18:17:05.4799600,3180,8\n")
    mooncake = tmp_path / "m.jsonl"
    mooncake.write_text('{"timestamp": 1000, "input_length": 6758, "output_length": 500, "hash_ids": [0]}\n'
                        '{"timestamp": 3000, "input_length": 10, "output_length": 5, "hash_ids": [1]}\n')
    own = tmp_path / "own.csv"
    own.write_text("prompt_tokens,output_tokens\n5,6\n")
    assert list(load_trace(sarathi)) == [Request(7564, 192)]
    a = load_trace(azure)
    assert [(r.prompt_tokens, r.output_tokens) for r in a] == [(4808, 10), (3180, 8)]
    assert a[1].arrival_s == pytest.approx(1.5)
    m = load_trace(mooncake)
    assert m[1] == Request(10, 5, 2.0)
    assert list(load_trace(own)) == [Request(5, 6)]
    bad = tmp_path / "bad.csv"
    bad.write_text("x,y\n1,2\n")
    with pytest.raises(ValueError, match="columns"):
        load_trace(bad)
    with pytest.raises(ValueError, match="trace"):
        load_trace("no-such-trace")


def test_shipped_traces_and_models():
    for name, rows in [("arxiv", 2895), ("sharegpt", 30731), ("azure-conv", 19366), ("azure-code", 8819)]:
        assert len(load_trace(name)) == rows
    llama = get_model("Llama-3-8B")
    assert llama.bytes_per_token(1) == 128 * KiB and llama.bytes_per_token(2) == 64 * KiB
    assert get_model("yi-34b").bytes_per_token(2) == 120 * KiB
    assert get_model("llama-3-70b").kv_heads_per_gpu(16) == 1  # replicated beyond 8 GPUs
    assert get_model("32,8,128").bytes_per_token(1) == 128 * KiB
    with pytest.raises(ValueError, match="tp"):
        get_model("yi-6b").kv_heads_per_gpu(3)
    with pytest.raises(ValueError, match="model"):
        get_model("gpt-17")
    assert get_model("llama-3-8b").max_context == 8192 and get_model("32,8,128").max_context is None


def test_cli_writes_table_json_and_plots(tmp_path, capsys):
    rc = frag_main(["--trace", "azure-conv", "--requests", "300", "--model", "yi-34b-200k", "--tp", "2",
                    "--budget", "8GiB", "--max-context", "16384", "--out", str(tmp_path), "--jobs", "1"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "| vAttention 64KiB |" in out and "| paged 16-token blocks |" in out
    doc = json.loads((tmp_path / "azure-conv-yi-34b-200k-tp2.json").read_text())
    assert len(doc["results"]) == len(DEFAULT_SCHEMES) and doc["tp"] == 2 and doc["max_context"] == 16384
    assert all(r["served"] == 300 for r in doc["results"])
    for png in ("waste", "concurrency"):
        assert (tmp_path / f"azure-conv-yi-34b-200k-tp2-{png}.png").stat().st_size > 10_000
    assert frag_main(["--model", "nope"]) == 2


def test_json_names_every_scheme_when_identical_runs_are_simulated_once(tmp_path):
    """At Llama-3-8B TP1 a 64 KiB page holds exactly 32 tokens: one run serves both schemes, and
    each JSON row still names its own scheme (a compacted copy once kept the first one's name)."""
    assert frag_main(["--trace", "azure-conv", "--requests", "200", "--out", str(tmp_path), "--jobs", "1"]) == 0
    doc = json.loads((tmp_path / "azure-conv-llama-3-8b-tp1.json").read_text())
    assert [r["scheme"] for r in doc["results"]] == [s.name for s in DEFAULT_SCHEMES]

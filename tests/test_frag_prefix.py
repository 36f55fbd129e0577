"""frag --prefix-sharing: shared tokens per scheme on a hand-computed trace, a closed form on the
shipped Mooncake sample, the pool's books under eviction and preemption, and bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pyvattn.frag.cli import main as frag_main
from pyvattn.frag.models import ModelConfig
from pyvattn.frag.prefix import HASH_BLOCK_TOKENS, PrefixPool, load_hashed_trace
from pyvattn.frag.prefix_report import PREFIX_SCHEMES, compare_prefix, hidden_loss_bound, simulate_prefix
from pyvattn.frag.report import Experiment
from pyvattn.frag.schemes import Scheme
from pyvattn.frag.traces import trace_path

KiB, MiB = 1 << 10, 1 << 20
# 1 layer of 8 KV heads x 128 fp16: 2 KiB per token per region, as Llama-3-8B's (64 KiB = 32 tokens)
ONE_LAYER = ModelConfig("one-layer", num_layers=1, num_kv_heads=8, head_dim=128)

# (input_length, hash_ids): b shares a's two full 512-token blocks, c its first, d both, but d's
# prompt is exactly 1,024 tokens and its last token is always computed (as vLLM does)
HAND = [(1100, [1, 2, 3]), (1300, [1, 2, 9]), (600, [1, 7]), (1024, [1, 2])]
# tokens saved (b + c + d) per scheme: a unit of G tokens is shared iff full and inside the
# matching 512-token blocks; d can take at most floor(1023 / G) units
HAND_SAVED = {
    "static (max length)": 0,
    "paged 16-token blocks": 1024 + 512 + 1008,
    "paged 32-token blocks": 1024 + 512 + 992,
    "paged 256-token blocks": 1024 + 512 + 768,
    "vAttention 64KiB": 1024 + 512 + 992,  # 32 tokens per page
    "vAttention 128KiB": 1024 + 512 + 960,
    "vAttention 256KiB": 1024 + 512 + 896,
    "vAttention 2MiB": 1024 + 0 + 0,  # 1,024 tokens per page: only b's first page is full and shared
}


def write_trace(path, records, output=1):
    path.write_text("".join(json.dumps({"timestamp": 0, "input_length": n, "output_length": output,
                                        "hash_ids": ids}) + "\n" for n, ids in records))
    return path


def experiment(trace, model=ONE_LAYER, budget=1 << 30, max_batch=64, max_context=4096, watermark=0.0):
    return Experiment(trace, model, 1, budget, max_batch, max_context=max_context, watermark=watermark)


@pytest.fixture
def hand(tmp_path):
    trace, chains = load_hashed_trace(write_trace(tmp_path / "hand.jsonl", HAND))
    return experiment(trace), chains


@pytest.mark.parametrize("scheme", PREFIX_SCHEMES, ids=lambda s: s.name)
def test_hand_computed_tokens_saved_per_scheme(hand, scheme):
    exp, chains = hand
    shared, alone = simulate_prefix(exp, chains, scheme), simulate_prefix(exp, chains, scheme, sharing=False)
    assert shared.saved_tokens == shared.saved_prompt_tokens == shared.unbounded_tokens == HAND_SAVED[scheme.name]
    assert alone.saved_tokens == 0 and shared.served == alone.served == 4
    assert shared.prefill_tokens == alone.prefill_tokens == shared.prompt_tokens == sum(n for n, _ in HAND)


def test_hand_computed_memory_counts_a_shared_unit_once(hand):
    exp, chains = hand
    r = simulate_prefix(exp, chains, Scheme("paged", block_tokens=16))
    # step 0: 69 + 82 + 38 + 64 blocks; b shares 64 of a's, c 32, d 63 (its 64th is computed, a
    # private duplicate of a's); step 1: d's 1,025th token needs a block
    unit = 16 * 2 * KiB * 2
    assert (r.steps, r.peak_in_use * unit, r.summary()["peak_in_use_bytes"]) == (2, 95 * unit, 95 * unit)
    assert r.sum_in_use == 94 + 95 and r.sum_unshared == 253 + 254
    assert r.summary()["mean_shared_saving_bytes"] == (253 + 254 - 94 - 95) * unit / 2
    assert hidden_loss_bound(exp, Scheme("paged", block_tokens=256), r) == pytest.approx(240 * 3 / 2544)


def closed_form_saved(records, unit_tokens):
    """Tokens saved with nothing evicted and requests admitted in order, from the raw hash_ids:
    the longest run of full 512-token blocks shared with any earlier request, in whole units, at
    most floor((prompt - 1) / unit) units."""
    seen, saved = set(), 0
    for n, ids in records:
        full = n // HASH_BLOCK_TOKENS
        m = max((i for i in range(full + 1) if tuple(ids[:i]) in seen), default=0)
        saved += min(HASH_BLOCK_TOKENS * m // unit_tokens, (n - 1) // unit_tokens) * unit_tokens
        seen.update(tuple(ids[:i]) for i in range(1, full + 1))
    return saved


def test_closed_form_on_the_shipped_mooncake_sample():
    path = trace_path("mooncake")
    records = [(r["input_length"], r["hash_ids"]) for r in map(json.loads, path.read_text().splitlines()[:300])]
    trace, chains = load_hashed_trace("mooncake", 300)
    llama = ModelConfig("llama-3.1-8b", 32, 8, 128, 2, 131_072)
    exp = experiment(trace, llama, budget=1 << 40, max_batch=16, max_context=131_072)  # nothing evicted
    for scheme, tokens in ((Scheme("paged", block_tokens=16), 16), (Scheme("vattn", page_bytes=64 * KiB), 32),
                           (Scheme("vattn", page_bytes=2 * MiB), 1024)):
        r = simulate_prefix(exp, chains, scheme)
        assert (r.served, r.preemptions, r.evictions) == (300, 0, 0)
        assert r.saved_tokens == r.saved_prompt_tokens == r.unbounded_tokens == closed_form_saved(records, tokens) > 0


def test_pool_evicts_least_recently_used_and_a_request_tail_first():
    pool = PrefixPool(6)
    assert pool.acquire([10, 11, 12], 0, 4) == [10, 11, 12] and pool.private == 1
    assert pool.acquire([10, 11, 20], 2, 3) == [10, 11, 20] and pool.refs == {10: 2, 11: 2, 12: 1, 20: 1}
    assert pool.referenced == 5 and pool.available() == 1
    pool.release([10, 11, 12], 1)
    assert list(pool.cached) == [12] and pool.referenced == 3  # 10 and 11 are still referenced
    pool.release([10, 11, 20], 0)
    assert list(pool.cached) == [12, 20, 11, 10]  # each request's tail first: evicted first
    pool.grow_private(4)  # 2 free, then 12 and 20 are evicted
    assert list(pool.cached) == [11, 10] and pool.evictions == 2 and pool.hits([10, 11, 12], 3) == 2
    assert pool.cost([10, 11, 12], 2, 3) == 3  # two cached hits leave the cache, one unit is new
    pool.check()


@pytest.mark.parametrize("scheme", [Scheme("paged", block_tokens=16), Scheme("vattn", page_bytes=256 * KiB)],
                         ids=lambda s: s.name)
def test_books_equal_reality_every_step_under_eviction_and_preemption(scheme):
    trace, chains = load_hashed_trace("mooncake", 150)
    exp = experiment(trace, ModelConfig("llama-3.1-8b", 32, 8, 128, 2, 131_072), budget=3 << 30,
                     max_context=131_072, watermark=0.01)
    unit = exp.unit_bytes(scheme) // exp.model.token_bytes()

    def check(step, server):
        pool = server.pool
        pool.check()
        keys = [k for r in server.running for k in server.keys[r]]
        assert set(pool.refs) == set(keys) and sum(pool.refs.values()) == len(keys)
        assert pool.private == int(server.private[server.running].sum())
        for r in server.running:
            assert server.held[r] == -(-server.length[r] // unit) == len(server.keys[r]) + server.private[r]
        assert pool.referenced + len(pool.cached) <= pool.capacity

    r = simulate_prefix(exp, chains, scheme, on_step=check)
    alone = simulate_prefix(exp, chains, scheme, sharing=False)
    assert r.preemptions > 0 and r.evictions > 0 and 0 < r.saved_prompt_tokens < r.unbounded_tokens
    assert r.served + r.rejected_total == alone.served + alone.rejected_total == 150


def test_cli_table_json_and_plot(tmp_path, capsys):
    path = write_trace(tmp_path / "hand.jsonl", HAND)
    rc = frag_main(["--trace", str(path), "--model", "1,8,128", "--max-context", "4096", "--prefix-sharing",
                    "--out", str(tmp_path), "--jobs", "2"])
    out = capsys.readouterr().out
    assert rc == 0 and "| paged 16-token blocks | 16 | 2,544 (" in out and "| vAttention 2MiB | 1024 | 1,024 (" in out
    doc = json.loads((tmp_path / "hand-custom-1-8-128-tp1-prefix.json").read_text())
    assert {r["scheme"]: r["sharing"]["saved_tokens"] for r in doc["results"]} == HAND_SAVED
    assert all(r["no_sharing"]["saved_tokens"] == 0 for r in doc["results"])
    png = tmp_path / "hand-custom-1-8-128-tp1-prefix.png"
    assert png.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("records,message", [
    ([(600, [1, 2]), (600, [1])], r"bad.jsonl:2: 1 hash_ids for input_length=600 \(expected 2, one per 512"),
    ([(600, [1, "x"])], r"bad.jsonl:1: hash_ids=\[1, 'x'\] is not a list of whole numbers >= 0"),
    ([(600, [1, -2])], r"bad.jsonl:1: hash_ids=\[1, -2\] is not a list"),
    ([(600, None)], r"bad.jsonl:1: no hash_ids: --prefix-sharing needs them on every record"),
])
def test_bad_hash_ids_name_the_line_and_exit_2(tmp_path, capsys, records, message):
    path = tmp_path / "bad.jsonl"
    path.write_text("".join(json.dumps({"input_length": n, "output_length": 1,
                                        **({"hash_ids": ids} if ids is not None else {})}) + "\n"
                            for n, ids in records))
    assert frag_main(["--trace", str(path), "--prefix-sharing", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    import re
    assert re.search(message, err), err


@pytest.mark.parametrize("trace,message", [
    ("arxiv", "needs block hashes (Mooncake JSONL hash_ids); trace arxiv (arxiv_sample.csv) has none"),
    ("synthetic:10", "a synthetic trace has none"),
])
def test_trace_without_hashes_is_a_clear_error(tmp_path, capsys, trace, message):
    assert frag_main(["--trace", trace, "--prefix-sharing", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_measured_does_not_apply_with_prefix_sharing(capsys):
    with pytest.raises(SystemExit) as exc:
        frag_main(["--trace", "mooncake", "--prefix-sharing", "--measured"])
    assert exc.value.code == 2 and "--measured does not apply with --prefix-sharing" in capsys.readouterr().err


def test_compare_prefix_runs_equal_units_once_and_static_without_sharing(hand):
    exp, chains = hand
    pairs = compare_prefix(exp, chains, jobs=1, progress=False)
    by_name = {w.scheme: (w, a) for w, a in pairs}
    assert [w.scheme for w, _ in pairs] == [s.name for s in PREFIX_SCHEMES]
    assert by_name["vAttention 64KiB"][0].summary() | {"scheme": ""} == \
        by_name["paged 32-token blocks"][0].summary() | {"scheme": ""}
    static, static_alone = by_name["static (max length)"]
    assert static.summary() == static_alone.summary() and not static.sharing
    assert np.isclose(by_name["paged 16-token blocks"][0].summary()["saved_fraction"], 2544 / 4024)


@pytest.mark.parametrize("scheme", [Scheme("paged", block_tokens=32), Scheme("vattn", page_bytes=2 * MiB)],
                         ids=lambda s: s.name)
def test_jumps_equal_a_step_by_step_run(monkeypatch, scheme):
    from pyvattn.frag import prefix_sim

    trace, chains = load_hashed_trace("mooncake", 60)
    exp = experiment(trace, ModelConfig("llama-3.1-8b", 32, 8, 128, 2, 131_072), budget=2 << 30,
                     max_context=131_072, watermark=0.01)
    jumped = simulate_prefix(exp, chains, scheme).summary()
    monkeypatch.setattr(prefix_sim._SharedServer, "_jump", lambda self: None)
    stepped = simulate_prefix(exp, chains, scheme).summary()
    assert jumped == stepped and jumped["evictions"] > 0 and jumped["steps"] > 1000

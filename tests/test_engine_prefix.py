"""Prefix caching in pyvattn.engine: a request starts its prefill at the whole pages of its tokens
another request wrote (``KVCache.alloc_slot(tokens=...)``), and still generates exactly what
transformers' own generate gives it alone (float64, so no rounding tie can flip a token).

Every model here has 16 tokens per 4 KiB page (float64, 256 bytes per token and region), so the
tokens saved are computed by hand: whole 16-token blocks of the shared prefix, never the last
prompt token.
"""

from __future__ import annotations

import random

import pytest

from books import check_cache
from faults import BACKEND_CALLS, Injector
from hfmodels import fail_forward_at, model, one_thread  # noqa: F401 (fixture)
from pyvattn.engine import Engine
from pyvattn.integrations.transformers import generate_alone

pytestmark = pytest.mark.usefixtures("one_thread")

BLOCK = 16  # tokens per 4 KiB page for every tiny model in float64


def tokens(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, 500) for _ in range(n)]


def check_alone(m, requests):
    for req in requests:
        assert req.output == generate_alone(m, req.prompt, req.max_new_tokens), f"request {req.rid}"


def check_books(engine):
    """Nothing half-admitted: the running requests hold exactly the cache's active slots, every
    waiting one holds none and starts from 0; the cache's books equal the backend's."""
    sched, kv = engine.scheduler, engine.kv
    assert sorted(r.slot for r in sched.running) == [s for s in range(kv.max_batch_size) if kv._slots.active[s]]
    assert all(r.slot is None and r.computed == 0 for r in sched.waiting)
    assert all(kv.seq_len(r.slot) == r.computed for r in sched.running)  # stepped = written, between passes
    check_cache(kv)


def engine_for(m, prefix_caching=True, **options) -> Engine:
    options = {"max_batch_size": 4, "max_seq_len": 160, "max_batched_tokens": 64, "page_size": "4KiB", **options}
    return Engine.for_model(m, prefix_caching=prefix_caching, **options)


@pytest.mark.parametrize("prefix_caching", [True, False])
def test_a_system_prompt_is_computed_once_while_its_owner_runs(prefix_caching):
    """Four requests arrive while the first one with the same 40-token system prompt is still
    running: each shares its 2 whole pages (a fork) and computes only the rest; two requests
    that share nothing compute everything."""
    m = model("mistral-tiny")
    system = tokens(40, seed=1)
    with engine_for(m, prefix_caching, max_batch_size=8, max_batched_tokens=256) as engine:
        owner = engine.submit(system + tokens(9, seed=2), 12)
        engine.step()  # the owner's prompt is written; it decodes from here on
        shared = [engine.submit(system + tokens(n, seed=10 + n), 6) for n in (1, 7, 20, 33)]
        alone = [engine.submit(tokens(n, seed=20 + n), 5) for n in (17, 50)]
        engine.step()
        assert shared[0].slot is not None and owner.slot is not None  # admitted next to the running owner
        stats = engine.stats()
        if prefix_caching:
            assert stats["forks"] == 4 and stats["shared_pages"] > 0
            assert [r.computed for r in shared] == [41, 47, 60, 73]  # 32 cached + the prompt's rest
        engine.run()
        stats = engine.stats()
    saved = 4 * 2 * BLOCK if prefix_caching else 0
    assert stats["prefill_tokens_saved"] == saved
    assert stats["prefix_cache_hits"] == (4 if prefix_caching else 0)
    assert stats["admissions"] == 7 and stats["preemptions"] == 0
    assert stats["prefill_tokens"] + saved == sum(len(r.prompt) for r in [owner, *shared, *alone])
    check_alone(m, [owner, *shared, *alone])


def test_a_finished_requests_prefix_is_taken_over_in_place():
    """After the owner finished, a request with its prompt takes its slot over in place (no
    fork); a follow-up whose prompt is the owner's prompt and output computes only its last token."""
    m = model("qwen3-tiny")
    system = tokens(48, seed=3)  # 3 whole pages
    with engine_for(m) as engine:
        (owner,) = engine.run([(system, 9)])
        before = engine.stats()
        (again,) = engine.run([(system + tokens(5, seed=4), 4)])
        after = engine.stats()
        assert after["forks"] == before["forks"]  # taken over, not shared
        assert after["prefill_tokens_saved"] - before["prefill_tokens_saved"] == 3 * BLOCK
        assert after["prefill_tokens"] - before["prefill_tokens"] == 5
        turn = system + owner.output[:1]  # 49 tokens: 48 cached, the last one computed
        (follow,) = engine.run([(turn, 6)])
        last = engine.stats()
        assert last["prefill_tokens_saved"] - after["prefill_tokens_saved"] == 3 * BLOCK
        assert last["prefill_tokens"] - after["prefill_tokens"] == 1
        # a prompt of exactly 3 pages, all cached: its last page is computed (its last token's logits)
        (whole,) = engine.run([(system, 3)])
        assert engine.stats()["prefill_tokens"] - last["prefill_tokens"] == BLOCK
        check_books(engine)
    check_alone(m, [owner, again, follow, whole])


def test_preempted_requests_resume_from_their_own_prefix():
    """A budget tight enough to preempt: requests sharing a system prompt, recomputed after
    preemption from what the cache still holds of their own tokens; every output is right."""
    m = model("llama-tiny")
    system = tokens(36, seed=5)
    rng = random.Random(6)
    work = [(system + tokens(rng.randint(1, 30), seed=100 + i), rng.randint(8, 24)) for i in range(10)]
    work += [(tokens(rng.randint(10, 40), seed=200 + i), rng.randint(4, 12)) for i in range(3)]
    regions = 2 * m.config.num_hidden_layers
    with engine_for(m, max_batch_size=6, max_batched_tokens=48, memory_budget=16 * regions * 4096) as engine:
        requests = engine.run(work)
        stats = engine.stats()
        assert stats["preemptions"] > 0
        assert stats["prefill_tokens_saved"] >= 2 * BLOCK and stats["prefix_cache_hits"] > 0
        assert stats["admissions"] == len(work) + stats["preemptions"]
        assert stats["active_slots"] == 0 and stats["used_bytes"] == 0
        check_books(engine)
    check_alone(m, requests)


def _workload():
    system = tokens(34, seed=7)
    return [(system + tokens(n, seed=30 + n), k) for n, k in ((3, 5), (12, 3), (25, 4))] + [(tokens(20, seed=8), 3)]


def _serve(engine, work, submitted: list, arrive_late=2) -> None:
    """The first request, then the rest once it has run ``arrive_late`` passes (so they find its
    pages written), then every pass to the end; ``submitted`` gets each request as it is made."""
    submitted.append(engine.submit(*work[0]))
    for _ in range(arrive_late):
        engine.step()
    submitted.extend(engine.submit(p, n) for p, n in work[1:])
    engine.run()


@pytest.mark.parametrize("exc", [KeyboardInterrupt, RuntimeError])
def test_a_failed_pass_keeps_its_unwritten_tokens_out_of_the_prefix_index(exc, monkeypatch):
    """The forward pass raises at pass k (every k in turn): its requests were stepped past what
    they wrote, are preempted, and resume from what they wrote; nobody reads an unwritten page."""
    m = model("mistral-tiny")
    work = _workload()
    with engine_for(m, max_batched_tokens=24) as engine:
        _serve(engine, work, [])
        passes = engine.steps
        assert engine.stats()["prefill_tokens_saved"] > 0
    for fail_at in range(passes):
        with engine_for(m, max_batched_tokens=24) as engine:
            fail_forward_at(monkeypatch, engine, fail_at, exc)
            submitted = []
            with pytest.raises(exc):
                _serve(engine, work, submitted)
            check_books(engine)
            if len(submitted) == 1:  # failed before the others arrived
                submitted.extend(engine.submit(p, n) for p, n in work[1:])
            engine.run()
            check_books(engine)
            check_alone(m, submitted)


@pytest.mark.parametrize("where", ["cache", "backend"])
def test_admission_failing_at_any_call_admits_nothing_half(where, monkeypatch):
    """Every call the admission path makes into the cache (``alloc_slot``, ``cached_tokens``,
    ``step``) or the cache into its backend (map, unmap, create, release) raises in turn: after
    the error the running requests hold exactly the active slots, the waiting ones none, and the
    engine goes on to the right tokens."""
    m = model("qwen3-tiny")
    work = _workload()
    calls = ("alloc_slot", "cached_tokens", "step")

    def install(engine, injector):
        target, names = (engine.kv, calls) if where == "cache" else (engine.kv.backend, BACKEND_CALLS)
        injector.install(monkeypatch, target, names)

    with engine_for(m, max_batched_tokens=24, memory_budget="96KiB") as engine:
        counter = Injector(at=0)
        install(engine, counter)
        _serve(engine, work, [])
        assert engine.stats()["prefill_tokens_saved"] > 0 and engine.stats()["reclaimed_pages_total"] > 0
        total = counter.calls
    fired = 0
    for at in range(1, total + 1):
        with engine_for(m, max_batched_tokens=24, memory_budget="96KiB") as engine:
            injector = Injector(at, error=KeyboardInterrupt() if at % 2 else RuntimeError("injected"))
            install(engine, injector)
            submitted = []
            with pytest.raises((KeyboardInterrupt, RuntimeError)):
                _serve(engine, work, submitted)
            fired += injector.fired
            injector.enabled = False
            check_books(engine)
            if len(submitted) == 1:
                submitted.extend(engine.submit(p, n) for p, n in work[1:])
            engine.run()
            check_books(engine)
            assert all(r.done for r in submitted)
            check_alone(m, submitted)
    assert fired == total


def test_prefix_caching_must_be_a_bool():
    m = model("mistral-tiny")
    with pytest.raises(ValueError, match="prefix_caching"):
        engine_for(m, prefix_caching="yes")


def test_free_slot_keeps_only_what_was_written_findable():
    """``free_slot(written=n)``: a later prompt finds only the whole pages below ``n``; a bad
    ``written`` is refused naming it, the slot still allocated."""
    import torch

    from pyvattn import KVCache

    prompt = tokens(70, seed=9)
    with KVCache(1, 2, 16, 2, 128, torch.float64, page_size="4KiB") as kv:
        slot = kv.alloc_slot(tokens=prompt)
        kv.step({slot: 70})
        for bad in (-1, 2.0, True):
            with pytest.raises(ValueError, match="written"):
                kv.free_slot(slot, written=bad)
        kv.free_slot(slot, written=40)  # stepped to 70, wrote 40: 2 whole pages findable
        again = kv.alloc_slot(tokens=prompt)
        assert again == slot and kv.cached_tokens(again) == 2 * BLOCK
        check_cache(kv)


@pytest.mark.parametrize("caching", [True, False])
def test_serve_with_a_shared_system_prompt_verifies_every_request(caching):
    """``serve --shared-prefix 64`` (4 whole pages: llama-tiny, float64, 16 tokens per 4 KiB
    page): the first 4 requests arrive together and are admitted in one pass, before any of them
    wrote the prefix, so each computes it; the 4 after them find it cached. ``--verify`` checks
    every request."""
    import re
    import subprocess
    import sys

    from hfmodels import subprocess_env

    args = ["--requests", "8", "--dtype", "float64", "--scale", "0.01", "--page-size", "4KiB", "--budget", "4MiB",
            "--max-batch", "4", "--shared-prefix", "64", "--verify"] + ([] if caching else ["--no-prefix-caching"])
    r = subprocess.run([sys.executable, "-m", "pyvattn", "serve", *args], capture_output=True, text=True,
                       timeout=300, env=subprocess_env())
    assert r.returncode == 0, r.stdout + r.stderr
    assert "verify: 8/8 requests equal to generating them alone" in r.stdout
    line = re.search(r"prefill: (\d+) tokens computed, (\d+) saved by prefix caching \((\d+) of (\d+) admissions",
                     r.stdout)
    computed, saved, hits, admissions = map(int, line.groups())
    prompts = int(re.search(r"prompts (\d+) tokens \(64 shared by all\)", r.stdout).group(1))
    assert admissions == 8  # a budget with room: no preemption
    assert (hits, saved) == ((4, 4 * 64) if caching else (0, 0))
    assert computed + saved == prompts

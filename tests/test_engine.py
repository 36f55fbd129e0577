"""pyvattn.engine: continuous batching whose every request equals generating it alone.

The reference for each request is transformers' own greedy generate of that request alone (its
DynamicCache, SDPA attention); the engine packs requests into mixed prefill/decode passes over a
KVCache, attention through pyvattn.attention. float64, so no rounding tie can flip a token.
"""

from __future__ import annotations

import random
import sys
import time

import pytest
import torch

from hfmodels import fail_forward_at, model, one_thread, subprocess_env  # noqa: F401 (fixture)
from pyvattn import KVCache, OutOfPages
from pyvattn.engine import Engine, Scheduler
from pyvattn.integrations.transformers import generate_alone

pytestmark = pytest.mark.usefixtures("one_thread")


def workload(n: int, seed: int, prompt=(1, 60), new=(1, 24)) -> list[tuple[list[int], int]]:
    rng = random.Random(seed)
    return [([rng.randrange(3, 500) for _ in range(rng.randint(*prompt))], rng.randint(*new)) for _ in range(n)]


def check_alone(m, work, requests):
    for (prompt, new), req in zip(work, requests):
        assert req.output == generate_alone(m, prompt, new), f"request {req.rid}"


def record_plans(monkeypatch) -> list[list[int]]:
    """Token counts of every scheduled pass."""
    plans: list[list[int]] = []
    real = Scheduler.schedule

    def schedule(self, now):
        plan = real(self, now)
        plans.append([n for _, n in plan])
        return plan

    monkeypatch.setattr(Scheduler, "schedule", schedule)
    return plans


@pytest.mark.parametrize("family", ["llama-tiny", "mistral-tiny", "qwen2-tiny", "qwen3-tiny"])
def test_every_request_equals_generating_it_alone(family, monkeypatch):
    """Chunked prefill mixed with decode, waiting for memory and preemption all happen."""
    m = model(family)
    work = workload(14, seed=1)
    plans = record_plans(monkeypatch)
    regions = 2 * m.config.num_hidden_layers  # 16 tokens per 4 KiB page; a request needs up to 6 pages
    with Engine.for_model(m, max_batch_size=6, max_seq_len=128, max_batched_tokens=40,
                          page_size="4KiB", memory_budget=15 * regions * 4096) as engine:
        requests = engine.run(work)
        stats = engine.stats()
        assert stats["preemptions"] > 0
        assert stats["active_slots"] == 0 and stats["used_bytes"] == 0
    assert any(1 in p and any(n > 1 for n in p) for p in plans)  # prefill and decode in one pass
    assert max(len(p) for p in plans) > 1
    check_alone(m, work, requests)


def test_hundreds_of_requests_through_sixty_four_slots():
    m = model("llama-tiny")
    work = workload(160, seed=2, prompt=(1, 12), new=(1, 4))
    with Engine.for_model(m, max_batch_size=64, max_seq_len=32, max_batched_tokens=256, page_size="4KiB") as engine:
        requests = engine.run(work)
        stats = engine.stats()
        # 15 tokens at most: one page per region per slot, mapped once; later requests reuse it
        assert stats["mapped_pages_total"] <= 64 * engine.kv.num_regions
        assert stats["map_calls"] < 20  # admissions of a pass share one step
    check_alone(m, work, requests)


def test_admission_waits_for_memory():
    """A budget for two requests at a time: the others wait (no preemption needed), all finish."""
    m = model("qwen3-tiny")
    work = workload(6, seed=3, prompt=(5, 10), new=(2, 6))  # at most 15 tokens: one page
    kv = KVCache(2, 1, 32, max_batch_size=6, max_seq_len=64, dtype=torch.float64, page_size="4KiB",
                 memory_budget=2 * 4 * 4096)  # 2 requests x 4 regions x one 16-token page
    running = []
    with Engine(m, kv, max_batched_tokens=64) as engine:
        requests = engine.run(work, progress=lambda e, done: running.append(len(e.scheduler.running)))
        assert engine.stats()["preemptions"] == 0
    assert max(running) == 2
    check_alone(m, work, requests)


@pytest.mark.parametrize("exc", [KeyboardInterrupt, RuntimeError])
def test_a_failed_pass_at_any_step_is_recomputed(exc, monkeypatch):
    """The forward pass raises at step k (every k in turn); stepping on gives the right tokens."""
    m = model("mistral-tiny")
    work = workload(5, seed=4, prompt=(1, 30), new=(1, 10))
    with Engine.for_model(m, max_batch_size=3, max_seq_len=64, max_batched_tokens=16, page_size="4KiB") as engine:
        engine.run(work)
        total = engine.steps
    for fail_at in range(total):
        with Engine.for_model(m, max_batch_size=3, max_seq_len=64, max_batched_tokens=16, page_size="4KiB",
                              memory_budget="96KiB") as engine:
            requests = [engine.submit(p, n) for p, n in work]
            fail_forward_at(monkeypatch, engine, fail_at, exc)
            with pytest.raises(exc):
                while engine.has_work:
                    engine.step()
            while engine.has_work:
                engine.step()
            assert engine.model.config._attn_implementation == "sdpa"  # restored after the failure
            check_alone(m, work, requests)


def test_arrivals_are_waited_for():
    m = model("llama-tiny")
    with Engine.for_model(m, max_batch_size=2, max_seq_len=64, page_size="4KiB") as engine:
        now = engine.submit([5, 6, 7], 2)
        later = engine.submit([8, 9], 2, arrival_s=0.3)
        t0 = time.monotonic()
        while engine.has_work:
            engine.step()
        assert later.finished_s >= 0.3 > now.finished_s
        assert time.monotonic() - t0 >= 0.2
    assert later.output == generate_alone(m, [8, 9], 2)


def test_too_big_for_memory_and_bad_arguments():
    m = model("llama-tiny")
    with Engine.for_model(m, max_batch_size=2, max_seq_len=256, page_size="4KiB", memory_budget="32KiB") as engine:
        engine.submit(list(range(3, 200)), 4)
        with pytest.raises(OutOfPages, match="even alone"):
            engine.run()
    with Engine.for_model(m, max_batch_size=2, max_seq_len=16, page_size="4KiB") as engine:
        with pytest.raises(ValueError, match="max_seq_len=16"):
            engine.submit(list(range(3, 15)), 6)
        with pytest.raises(ValueError, match="prompt"):
            engine.submit([], 3)
        with pytest.raises(ValueError, match="max_new_tokens"):
            engine.submit([3], 0)
    with pytest.raises(ValueError, match="max_batched_tokens"):
        Engine.for_model(m, 2, 16, max_batched_tokens=0)
    with KVCache(3, 2, 16, 2, 16, dtype=torch.float64) as wrong, pytest.raises(ValueError, match="4 x 2 x 16"):
        Engine(m, wrong)
    with pytest.raises(ValueError, match="sliding window"):
        Engine.for_model(model("mistral-tiny-swa"), 2, 64)


def test_serve_command_verifies_every_request():
    import subprocess

    r = subprocess.run([sys.executable, "-m", "pyvattn", "serve", "--requests", "12", "--dtype", "float64",
                        "--scale", "0.01", "--page-size", "4KiB", "--budget", "1MiB", "--max-batch", "4",
                        "--verify"], capture_output=True, text=True, timeout=300, env=subprocess_env())
    assert r.returncode == 0, r.stdout + r.stderr
    assert "verify: 12/12 requests equal to generating them alone" in r.stdout
    assert "tok/s" in r.stdout and "KV used" in r.stdout


@pytest.mark.parametrize("args, message", [
    (["--trace", "nope"], "neither a shipped trace"), (["--model-config", "gpt"], "llama-tiny"),
    (["--budget", "12XB"], "--budget"), (["--requests", "0"], "--requests"), (["--scale", "-1"], "--scale"),
    (["--device", "cuda:9"], "--device"), (["--page-size", "3KiB"], "page_size"), (["--backend", "x"], "backend"),
    (["--shared-prefix", "-1"], "--shared-prefix"), (["--shared-prefix", "x"], "--shared-prefix"),
    (["--shared-prefix", "64", "--max-seq-len", "64"], "--shared-prefix"),
])
def test_serve_bad_arguments_one_line_exit_2(args, message):
    import subprocess

    r = subprocess.run([sys.executable, "-m", "pyvattn", "serve", *args], capture_output=True, text=True,
                       timeout=120, env=subprocess_env())
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and message in r.stderr and "Traceback" not in r.stderr


def test_serve_help_imports_no_torch():
    import subprocess

    code = ("import sys; from pyvattn.__main__ import main\n"
            "try: main(['serve', '--help'])\nexcept SystemExit: pass\n"
            "assert 'torch' not in sys.modules, 'torch imported'")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "--model-config" in r.stdout


def test_tiny_model_table_knows_its_kv_shape():
    """serve sizes its KVCache from the table before importing transformers: it must agree."""
    from pyvattn.integrations.tiny import TINY_MODELS, tiny_config
    from pyvattn.integrations.transformers import cache_shape

    for name, spec in TINY_MODELS.items():
        assert spec.kv_shape == cache_shape(tiny_config(name)), name

"""Shared helpers for the tests that run transformers models with random weights."""

from __future__ import annotations

import functools

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="needs pyvattn[hf] (transformers)")

from pyvattn.integrations.tiny import build_model  # noqa: E402

FAMILIES = ["llama-tiny", "mistral-tiny", "qwen2-tiny", "qwen3-tiny"]
PAD = 0
GREEDY = dict(do_sample=False, pad_token_id=PAD, eos_token_id=None)


@pytest.fixture(autouse=False)
def one_thread():
    """Tiny models make tiny ops: with CPU threads contended (CI's two cores, shared), OpenMP's
    spinning makes them 10-30x slower than one thread. Restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def subprocess_env() -> dict:
    """Environment for a ``python -m pyvattn`` child: one OpenMP thread, as ``one_thread``."""
    import os

    return {**os.environ, "OMP_NUM_THREADS": "1"}


@functools.cache
def model(name: str, dtype: torch.dtype = torch.float64):
    """One model per (name, dtype) for the whole session: building is the slow part."""
    return build_model(name, dtype=dtype)


def prompts(lengths: list[int], seed: int = 0, pad_to: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Random prompts of ``lengths`` tokens, left-padded to the longest (or ``pad_to``):
    ``(input_ids, attention_mask)``. Token ids avoid the pad id."""
    gen = torch.Generator().manual_seed(seed)
    width = max(max(lengths), pad_to or 0)
    ids = torch.full((len(lengths), width), PAD, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        ids[row, width - n:] = torch.randint(3, 500, (n,), generator=gen)
        mask[row, width - n:] = 1
    return ids, mask


def fail_forward_at(monkeypatch, engine, index: int, exc: type[BaseException]) -> None:
    """Make ``engine``'s forward pass number ``index`` (from 0) raise ``exc("injected")``."""
    real, calls = engine._forward, []

    def forward(batch):
        calls.append(1)
        if len(calls) == index + 1:
            raise exc("injected")
        return real(batch)

    monkeypatch.setattr(engine, "_forward", forward)

"""Small decoder-only models with random weights: real architectures, no download.

``build_model("llama-tiny")`` returns a transformers ``*ForCausalLM`` built from a small config of
that family (2-4 layers, hidden size 64-128, grouped-query attention), its weights drawn from a
seeded generator, in eval mode. The names are what ``python -m pyvattn serve --model-config``
and ``scripts/bench_generate.py --model-config`` accept.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TinyModel:
    """One model family at a small size. ``config_kwargs`` go to the family's config class."""

    family: str  # transformers' config class name
    config_kwargs: tuple[tuple[str, object], ...]
    note: str

    @property
    def kv_shape(self) -> tuple[int, int, int]:
        """``(layers, kv_heads, head_dim)`` of its KV cache, without importing transformers."""
        kw = dict(self.config_kwargs)
        head_dim = kw.get("head_dim") or kw["hidden_size"] // kw["num_attention_heads"]
        return kw["num_hidden_layers"], kw["num_key_value_heads"], head_dim


_COMMON = (("vocab_size", 512), ("max_position_embeddings", 8192), ("tie_word_embeddings", False))

TINY_MODELS: dict[str, TinyModel] = {
    "llama-tiny": TinyModel("LlamaConfig", _COMMON + (
        ("num_hidden_layers", 4), ("hidden_size", 128), ("intermediate_size", 256),
        ("num_attention_heads", 8), ("num_key_value_heads", 2)), "Llama, GQA 8:2, head_dim 16"),
    "mistral-tiny": TinyModel("MistralConfig", _COMMON + (
        ("num_hidden_layers", 2), ("hidden_size", 64), ("intermediate_size", 128),
        ("num_attention_heads", 4), ("num_key_value_heads", 2), ("sliding_window", None)),
        "Mistral, GQA 4:2, head_dim 16 (full attention)"),
    "mistral-tiny-swa": TinyModel("MistralConfig", _COMMON + (
        ("num_hidden_layers", 2), ("hidden_size", 64), ("intermediate_size", 128),
        ("num_attention_heads", 4), ("num_key_value_heads", 2), ("sliding_window", 8)),
        "Mistral, GQA 4:2, sliding window of 8 tokens"),
    "qwen2-tiny": TinyModel("Qwen2Config", _COMMON + (
        ("num_hidden_layers", 3), ("hidden_size", 96), ("intermediate_size", 192),
        ("num_attention_heads", 6), ("num_key_value_heads", 2)), "Qwen2, GQA 6:2, head_dim 16, qkv bias"),
    "qwen3-tiny": TinyModel("Qwen3Config", _COMMON + (
        ("num_hidden_layers", 2), ("hidden_size", 64), ("intermediate_size", 128),
        ("num_attention_heads", 4), ("num_key_value_heads", 1), ("head_dim", 32)),
        "Qwen3, MQA 4:1, head_dim 32, q/k norms"),
}


def check_name(name: str) -> str:
    """``name`` if it is a known tiny model, else ``ValueError`` listing the names."""
    if name not in TINY_MODELS:
        raise ValueError(f"model config {name!r} is not one of {sorted(TINY_MODELS)}")
    return name


def tiny_config(name: str):
    """The transformers config of ``name``, with SDPA attention (transformers' eager attention
    turns the fully masked rows of left padding into NaN, which then spreads to the whole row)."""
    import transformers

    spec = TINY_MODELS[check_name(name)]
    config = getattr(transformers, spec.family)(**dict(spec.config_kwargs))
    config._attn_implementation = "sdpa"
    return config


def build_model(name: str, dtype=None, device="cpu", seed: int = 0):
    """A ``*ForCausalLM`` of ``name`` with seeded random weights, in eval mode, on ``device``."""
    import torch
    from transformers import AutoModelForCausalLM

    config = tiny_config(name)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
    return model.to(device=device, dtype=dtype or torch.float32).eval()


__all__ = ["TINY_MODELS", "TinyModel", "build_model", "check_name", "tiny_config"]

"""KV-cache shapes of common models (public config.json values), per GPU under tensor parallelism."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelConfig:
    """The attention shape that decides KV-cache size: layers, KV heads, head dim, bytes/element,
    and the context length a server reserves for under static allocation (``max_context``,
    config.json's ``max_position_embeddings``; None where unknown)."""

    name: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype_bytes: int = 2  # fp16 / bf16
    max_context: int | None = None

    def kv_heads_per_gpu(self, tp: int) -> int:
        """KV heads one GPU holds at tensor-parallel degree ``tp``. Beyond ``num_kv_heads`` GPUs
        the heads are replicated (1 per GPU), as vLLM and vAttention do."""
        if tp < 1:
            raise ValueError(f"--tp={tp} must be >= 1")
        if tp >= self.num_kv_heads:
            if tp % self.num_kv_heads:
                raise ValueError(f"--tp={tp} is not a multiple of {self.name}'s {self.num_kv_heads} KV heads")
            return 1
        if self.num_kv_heads % tp:
            raise ValueError(f"--tp={tp} does not divide {self.name}'s {self.num_kv_heads} KV heads")
        return self.num_kv_heads // tp

    def token_bytes(self, tp: int = 1) -> int:
        """Bytes of one token in one layer's K (or V) on one GPU: what one page row holds."""
        return self.kv_heads_per_gpu(tp) * self.head_dim * self.dtype_bytes

    def bytes_per_token(self, tp: int = 1) -> int:
        """K and V of all layers, per token, per GPU."""
        return 2 * self.num_layers * self.token_bytes(tp)


# research/traces-paper-models.md, section 5 (public config.json copies); the last field is
# max_position_embeddings. The 200K Yi variants and Llama-3.1-8B share their base model's shape.
MODELS: dict[str, ModelConfig] = {m.name.lower(): m for m in (
    ModelConfig("Yi-6B", 32, 4, 128, 2, 4096),
    ModelConfig("Yi-6B-200K", 32, 4, 128, 2, 200_000),
    ModelConfig("Llama-3-8B", 32, 8, 128, 2, 8192),
    ModelConfig("Llama-3.1-8B", 32, 8, 128, 2, 131_072),
    ModelConfig("Mistral-7B", 32, 8, 128, 2, 32_768),
    ModelConfig("Qwen2.5-7B", 28, 4, 128, 2, 131_072),
    ModelConfig("Yi-34B", 60, 8, 128, 2, 4096),
    ModelConfig("Yi-34B-200K", 60, 8, 128, 2, 200_000),
    ModelConfig("Llama-3-70B", 80, 8, 128, 2, 8192),
    ModelConfig("Llama-3.1-405B", 126, 8, 128, 2, 131_072),  # early config.json copies say 16 KV heads; Meta's is 8
)}


def register_model(config: ModelConfig) -> None:
    """Make ``config`` available to :func:`get_model` (and the CLI) under its name."""
    MODELS[config.name.lower()] = config


def get_model(spec: str) -> ModelConfig:
    """A model by name (case-insensitive) or from ``"layers,kv_heads,head_dim[,dtype_bytes]"`` (a
    shape without a context length: pass one to the experiment)."""
    key = spec.strip().lower()
    if key in MODELS:
        return MODELS[key]
    parts = key.split(",")
    if 3 <= len(parts) <= 4 and all(p.strip().isdigit() and int(p) > 0 for p in parts):
        nums = [int(p) for p in parts]
        return ModelConfig(f"custom({spec})", *nums)
    raise ValueError(f"--model={spec!r} is neither one of {model_names()} nor "
                     f"'layers,kv_heads,head_dim[,dtype_bytes]'")


def model_names() -> list[str]:
    """The names :func:`get_model` knows, as they are spelled."""
    return [m.name for m in MODELS.values()]

"""``VAttentionCache``: a Hugging Face transformers ``Cache`` backed by a :class:`pyvattn.KVCache`.

::

    from pyvattn.integrations.transformers import VAttentionCache

    cache = VAttentionCache(model.config, max_batch_size=8, max_seq_len=32768)
    out = model.generate(input_ids, attention_mask=mask, cache=cache, max_new_tokens=128)

(``cache=`` is transformers 5's name; ``past_key_values=`` still works until they drop it.)

How it differs from transformers' own caches:

* **DynamicCache** concatenates every step (``torch.cat`` of the whole past per layer per token);
  here each layer's update writes the new tokens into the contiguous slab at their position, and
  attention receives a *view* of the slab (``[batch, kv_heads, length, head_dim]``, no copy).
* **StaticCache** allocates ``max_cache_len`` tokens for every row up front; here only the virtual
  range is reserved, and physical pages are mapped under each row as it grows (one batched map for
  all layers' K and V, done by the first layer of a forward pass that crosses a page boundary).

Batch row ``i`` of the model is slot ``i`` of the KVCache (all ``max_batch_size`` slots are held by
this cache), so a batch of ``B`` rows reads ``k[:B, :length]``: a strided view. Rows share one
length, as in every transformers cache: left padding is masked by the attention mask, not skipped.

Supported: decoder-only models whose layers are all attention layers (``full_attention``, and
``sliding_attention``/``chunked_attention``, for which the whole history is kept and the mask
applies the window, so memory follows the tokens, not the window). Beam search
(``reorder_cache``), ``num_return_sequences`` expansion, contrastive/assisted rollbacks
(``batch_select_indices``, ``crop``) and reuse across ``generate`` calls work; so does
``copy.deepcopy`` (a prompt cache copied per request). Not compileable (the views change shape
every step; a max-length static view would read unmapped memory), no offloading.
"""

from __future__ import annotations

import inspect

import numpy as np
import torch
from transformers.cache_utils import Cache, CacheLayerMixin, get_layer_types_and_kwargs

from ..kvcache import KVCache

_ATTENTION_LAYER_TYPES = ("full_attention", "sliding_attention", "chunked_attention")
# KVCache arguments a user may pass through; the shape and the dtype/device come from elsewhere
KVCACHE_OPTIONS = tuple(name for name in inspect.signature(KVCache).parameters
                        if name not in ("num_layers", "num_kv_heads", "head_dim", "max_batch_size",
                                        "max_seq_len", "dtype", "device"))


def cache_shape(config) -> tuple[int, int, int]:
    """``(num_layers, num_kv_heads, head_dim)`` of a decoder-only transformers config whose layers
    all hold keys and values; ``ValueError`` naming what is unsupported otherwise."""
    text = config.get_text_config(decoder=True)
    if getattr(text, "is_encoder_decoder", False):
        raise ValueError("config: encoder-decoder models are not supported (decoder-only models only)")
    layer_types, _ = get_layer_types_and_kwargs(text)
    other = sorted(set(layer_types) - set(_ATTENTION_LAYER_TYPES))
    if other:
        raise ValueError(f"config: layer types {other} are not supported (only {list(_ATTENTION_LAYER_TYPES)})")
    heads = text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    return len(layer_types), kv_heads, head_dim


class _Slabs:
    """The KVCache under a VAttentionCache: created on demand, all slots held, rows mapped as
    they grow. Row ``i`` of every batch is slot ``i``."""

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, max_batch_size: int,
                 max_seq_len: int, options: dict):
        self.shape = dict(num_layers=num_layers, num_kv_heads=num_kv_heads, head_dim=head_dim,
                          max_batch_size=max_batch_size, max_seq_len=max_seq_len)
        self.options = options
        self.kv: KVCache | None = None
        self._mapped = np.zeros(max_batch_size, dtype=np.int64)  # tokens stepped, per row
        self._last = (0, 0)  # (rows, length) of the last ensure(): later ones within it are free

    def open(self, dtype: torch.dtype, device: torch.device | str) -> KVCache:
        """The KVCache, created with ``dtype``/``device`` on first use; later calls must agree."""
        if self.kv is None:
            kv = KVCache(**self.shape, dtype=dtype, device=device, **self.options)
            try:
                self._hold_all_slots(kv)
            except BaseException:
                kv.close()
                raise
            self.kv = kv
        elif dtype != self.kv.dtype or torch.device(device) != self.kv.device:
            raise ValueError(f"key/value states are {dtype} on {device}, but this cache holds "
                             f"{self.kv.dtype} on {self.kv.device} (give the model's dtype and device)")
        return self.kv

    @staticmethod
    def _hold_all_slots(kv: KVCache) -> None:
        """Allocate every slot: with all of them taken, slot ids are exactly 0..max_batch_size-1,
        whatever order ``alloc_slot`` hands them out in."""
        for _ in range(kv.max_batch_size):
            kv.alloc_slot()

    def ensure(self, rows: int, length: int) -> None:
        """Map tokens ``[0, length)`` of rows ``0..rows-1`` in every layer's K and V (one batched
        ``step``); ``OutOfPages`` leaves everything as it was."""
        last_rows, last_len = self._last
        if rows <= last_rows and length <= last_len:
            return
        if rows > self.kv.max_batch_size:
            raise ValueError(f"a batch of {rows} rows does not fit max_batch_size={self.kv.max_batch_size}")
        if length > self.kv.max_seq_len:
            raise ValueError(f"{length} tokens do not fit max_seq_len={self.kv.max_seq_len}")
        if (self._mapped[:rows] >= length).all():
            self._last = (rows, length)
            return
        self.kv.step(dict.fromkeys(range(rows), length))
        np.maximum(self._mapped[:rows], length, out=self._mapped[:rows])
        self._last = (rows, length)

    def reset(self, release_memory: bool) -> None:
        """Forget every row's length. Pages stay mapped for the next generation (deferred reclaim:
        they return to the pool when another allocation needs them), unless ``release_memory``."""
        self._mapped[:] = 0
        self._last = (0, 0)
        if self.kv is None:
            return
        for slot in range(self.kv.max_batch_size):
            self.kv.free_slot(slot)
        if release_memory:
            self.kv.trim()
        self._hold_all_slots(self.kv)

    def close(self) -> None:
        if self.kv is not None:
            self.kv.close()


class VAttentionLayer(CacheLayerMixin):
    """One decoder layer's keys and values: region ``layer_idx`` of a shared :class:`_Slabs`.

    ``keys``/``values`` are views ``[rows, kv_heads, length, head_dim]`` of the slabs (``None``
    before the first update), as transformers' attention functions expect.
    """

    is_compileable = False
    is_croppable = True
    is_sliding = False  # sliding layers keep their whole history; the mask applies the window

    def __init__(self, slabs: _Slabs, layer_idx: int):
        # CacheLayerMixin.__init__ would store keys/values; here they are views made on demand.
        self._slabs = slabs
        self.layer_idx = layer_idx
        self.rows = 0
        self.length = 0

    @property
    def is_initialized(self) -> bool:
        return self._slabs.kv is not None

    @property
    def keys(self) -> torch.Tensor | None:
        return self._view(self._slabs.kv.k) if self.is_initialized else None

    @property
    def values(self) -> torch.Tensor | None:
        return self._view(self._slabs.kv.v) if self.is_initialized else None

    def _view(self, regions: list[torch.Tensor]) -> torch.Tensor:
        return regions[self.layer_idx][: self.rows, : self.length].transpose(1, 2)

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self._slabs.open(key_states.dtype, key_states.device)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write ``key_states``/``value_states`` (``[batch, kv_heads, new_tokens, head_dim]``) at
        positions ``[length, length + new_tokens)`` of rows ``0..batch-1``; return views of
        everything the rows hold. Validates before writing: a bad call changes nothing."""
        kv = self._slabs.open(key_states.dtype, key_states.device)
        if value_states.shape != key_states.shape or value_states.dtype != key_states.dtype:
            raise ValueError(f"key_states {tuple(key_states.shape)} {key_states.dtype} and value_states "
                             f"{tuple(value_states.shape)} {value_states.dtype} differ")
        rows, heads, new, head_dim = key_states.shape
        if (heads, head_dim) != (kv.num_kv_heads, kv.head_dim):
            raise ValueError(f"key_states have {heads} heads of {head_dim}, the cache was built for "
                             f"{kv.num_kv_heads} KV heads of {kv.head_dim} (num_key_value_heads, head_dim)")
        if self.length and rows != self.rows:
            raise ValueError(f"layer {self.layer_idx} holds {self.rows} rows, the update has {rows}: "
                             f"reset() the cache before a new batch")
        end = self.length + new
        self._slabs.ensure(rows, end)
        kv.k[self.layer_idx][:rows, self.length:end] = key_states.transpose(1, 2)
        kv.v[self.layer_idx][:rows, self.length:end] = value_states.transpose(1, 2)
        self.rows, self.length = rows, end
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length

    def get_max_length(self) -> int:
        return self._slabs.shape["max_seq_len"]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0

    def reset(self) -> None:
        self.rows = self.length = 0

    def crop(self, tokens_to_remove: int) -> None:
        """Drop the last ``-tokens_to_remove`` tokens (a negative count, as ``DynamicLayer``)."""
        if tokens_to_remove > 0:
            raise ValueError(f"crop({tokens_to_remove}): pass a negative number of tokens to remove")
        self.length = max(0, self.length + tokens_to_remove)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._gather_rows(beam_idx)

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._gather_rows(torch.arange(self.rows).repeat_interleave(repeats))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        indices = torch.as_tensor(indices)
        self._gather_rows(indices.nonzero().flatten() if indices.dtype == torch.bool else indices)

    def _gather_rows(self, index: torch.Tensor) -> None:
        """New row ``i`` = old row ``index[i]``, in place in the slabs (rows that are new get
        their pages mapped first)."""
        if self.length == 0:
            self.rows = 0
            return
        kv = self._slabs.kv
        index = index.to(device=kv.device, dtype=torch.long)
        rows = index.numel()
        self._slabs.ensure(rows, self.length)
        for regions in (kv.k, kv.v):
            slab = regions[self.layer_idx]
            # index_select copies the old rows (and checks the indices) before any row is written
            slab[:rows, : self.length] = slab[: self.rows, : self.length].index_select(0, index)
        self.rows = rows

    def offload(self):
        raise NotImplementedError("VAttentionCache does not offload")

    prefetch = offload


class VAttentionCache(Cache):
    """A transformers ``Cache`` whose keys and values live in a :class:`pyvattn.KVCache`.

    Args:
        config: the model's config (its text config is used: layers, KV heads, head size).
        max_batch_size: rows a generation may use (beams and returned sequences count).
        max_seq_len: tokens a row may hold (virtual reservation; memory is mapped as rows grow).
        dtype, device: of the keys and values. When both are ``None`` (default) they are taken
            from the first update (the model's); otherwise the KVCache is created at once.
        **kvcache_options: passed to :class:`pyvattn.KVCache`: ``page_size``, ``backend``,
            ``memory_budget``, ``deferred_reclaim``.

    ``kvcache`` is the KVCache (``stats()`` says what is mapped); ``close()`` (or ``with``)
    releases it. ``reset(release_memory=True)`` also returns the pages to the device.
    Errors: ``ValueError`` naming the argument for unsupported configs, bad options, batches or
    lengths past the limits; ``pyvattn.OutOfPages`` when memory runs out (nothing was written).
    """

    def __init__(self, config, max_batch_size: int, max_seq_len: int, dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None, **kvcache_options):
        num_layers, kv_heads, head_dim = cache_shape(config)
        unknown = sorted(set(kvcache_options) - set(KVCACHE_OPTIONS))
        if unknown:
            raise ValueError(f"kvcache_options: {unknown} are not KVCache options {list(KVCACHE_OPTIONS)}")
        self.config = config
        self._args = dict(max_batch_size=max_batch_size, max_seq_len=max_seq_len, **kvcache_options)
        self._slabs = _Slabs(num_layers, kv_heads, head_dim, max_batch_size, max_seq_len, kvcache_options)
        super().__init__(layers=[VAttentionLayer(self._slabs, i) for i in range(num_layers)])
        if dtype is not None or device is not None:
            self._slabs.open(dtype or torch.get_default_dtype(), device or "cpu")

    @property
    def kvcache(self) -> KVCache | None:
        """The KVCache under this cache (``None`` until the first update when created lazily)."""
        return self._slabs.kv

    def stats(self) -> dict:
        """``KVCache.stats()`` (empty before the KVCache exists)."""
        return self._slabs.kv.stats() if self._slabs.kv is not None else {}

    def reset(self, release_memory: bool = False) -> None:
        """Empty every layer for a new generation. Mapped pages are kept for it (and reclaimed if
        memory runs short) unless ``release_memory``, which returns them to the device."""
        for layer in self.layers:
            layer.reset()
        self._slabs.reset(release_memory)

    def close(self) -> None:
        """Release the KVCache; the cache must not be used afterwards."""
        self._slabs.close()

    def __enter__(self) -> "VAttentionCache":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __deepcopy__(self, memo) -> "VAttentionCache":
        """A new cache (its own KVCache) holding a copy of every row: a prefilled prompt cache can
        be copied per request, as with transformers' caches."""
        kv = self._slabs.kv
        new = VAttentionCache(self.config, **self._args,
                              **({} if kv is None else dict(dtype=kv.dtype, device=kv.device)))
        for old_layer, new_layer in zip(self.layers, new.layers):
            if old_layer.length:
                new._slabs.ensure(old_layer.rows, old_layer.length)
                for src, dst in ((kv.k, new.kvcache.k), (kv.v, new.kvcache.v)):
                    i, rows, length = old_layer.layer_idx, old_layer.rows, old_layer.length
                    dst[i][:rows, :length] = src[i][:rows, :length]
                new_layer.rows, new_layer.length = old_layer.rows, old_layer.length
        memo[id(self)] = new
        return new

    def __repr__(self) -> str:
        return f"VAttentionCache(layers={len(self.layers)}, length={self.get_seq_length()}, kvcache={self.kvcache!r})"


def generate_alone(model, prompt: list[int], max_new_tokens: int) -> list[int]:
    """The tokens greedy ``model.generate`` gives ``prompt`` alone, with transformers' own cache:
    the reference a batched engine's output must equal."""
    ids = torch.tensor([prompt], dtype=torch.long, device=model.device)
    out = model.generate(ids, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, do_sample=False,
                         pad_token_id=0, eos_token_id=None)
    return out[0, len(prompt):].tolist()


__all__ = ["KVCACHE_OPTIONS", "VAttentionCache", "VAttentionLayer", "cache_shape", "generate_alone"]

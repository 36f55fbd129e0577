"""Attention over the contiguous KV cache: decode and prefill for batches of requests of
different lengths.

Layouts are flash-attn's: caches are ``[max_batch, max_seq, Hkv, D]`` (``KVCache.k[layer]``),
queries ``[..., Hq, D]`` with ``Hq`` a multiple of ``Hkv`` (GQA/MQA). Three entry points:

* :func:`decode` -- one new token per request, attending to its first ``cache_seqlens[b]``
  cached tokens (write the token's K/V into the cache first).
* :func:`prefill` -- causal self-attention over prompts packed back to back
  (``flash_attn_varlen_func``'s layout: ``q/k/v [total_tokens, H, D]`` and ``cu_seqlens``).
* :func:`prefill_with_cache` -- chunked prefill: packed new queries attending to everything their
  request has in the cache (prefix plus the new tokens, whose K/V are already written), causal.

Implementations (``impl=``):

* ``"flash"``: flash-attn (``pip install pyvattn[flash]``) on CUDA tensors.
* ``"torch-flash"``: the FlashAttention-2 kernels that CUDA builds of PyTorch carry
  (``aten._flash_attention_forward``, varlen with ``seqused_k``) on fp16/bf16 CUDA tensors of
  compute capability 8.0+: no extra package, and like flash-attn it reads each request's rows in
  place, never past its length, in one kernel for the whole batch.
* ``"sdpa"``: ``torch.nn.functional.scaled_dot_product_attention``, one call per request on the
  slice ``cache[slot, :len]``: it never reads past a request's length, which matters on the host
  backend (unmapped pages are ``PROT_NONE``: a read is SIGSEGV) and on cuda-vmm (a fault).
* ``"auto"`` (default): flash when installed and the tensors are on CUDA, else torch-flash where
  it can run, else sdpa.
  :func:`backend_name` says which one a call would use.

Lengths are validated only when they already live on the host: the flash paths (flash-attn and
torch-flash) of ``decode`` and ``prefill`` (with ``max_seqlen``) never read GPU tensors back, which
would synchronize every layer of every step. ``prefill_with_cache`` and the SDPA paths read
lengths on the host (one sync per call).
"""

from __future__ import annotations

import logging
import math
from typing import Sequence

import torch
import torch.nn.functional as F

try:  # optional extra "flash"
    from flash_attn import flash_attn_varlen_func, flash_attn_with_kvcache
except Exception:  # ImportError, or a build that does not match this torch/CUDA
    flash_attn_varlen_func = flash_attn_with_kvcache = None

IMPLS = ("auto", "flash", "torch-flash", "sdpa")
log = logging.getLogger(__name__)
_logged: set[tuple[str, str]] = set()


def flash_available() -> bool:
    return flash_attn_with_kvcache is not None


FLASH_DTYPES = (torch.float16, torch.bfloat16)
_torch_flash_ok: dict[int, bool] = {}


def torch_flash_available(device: torch.device | str = "cuda") -> bool:
    """Whether this torch build carries its FlashAttention-2 kernels and ``device`` can run them
    (a CUDA GPU of compute capability 8.0 or newer)."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return False
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _torch_flash_ok:
        _torch_flash_ok[index] = (hasattr(torch.ops.aten, "_flash_attention_forward")
                                  and torch.backends.cuda.is_flash_attention_available()
                                  and torch.cuda.get_device_capability(index) >= (8, 0))
    return _torch_flash_ok[index]


def backend_name(device: torch.device | str | torch.Tensor, impl: str = "auto",
                 dtype: torch.dtype | None = None, head_dim: int | None = None) -> str:
    """The implementation a call would run for tensors on ``device`` (or like a given tensor, whose
    dtype and head size then count too): ``"flash-attn"``, ``"torch-flash"`` or ``"sdpa"``. Both
    flash paths run fp16/bf16 on CUDA with head sizes up to 256 that are multiples of 8; ``auto``
    picks flash-attn when installed, then torch-flash, then sdpa. ``ValueError`` if ``impl``
    cannot run."""
    if isinstance(device, torch.Tensor):
        dtype = device.dtype if dtype is None else dtype
        head_dim = device.shape[-1] if head_dim is None and device.dim() else head_dim
        device = device.device
    device = torch.device(device)
    if impl not in IMPLS:
        raise ValueError(f"impl={impl!r} is not one of {IMPLS}")
    flash_ok = (device.type == "cuda" and (dtype is None or dtype in FLASH_DTYPES)
                and (head_dim is None or (head_dim % 8 == 0 and head_dim <= 256)))
    if impl == "flash" and not flash_available():
        raise ValueError("impl='flash' needs flash-attn installed (pip install pyvattn[flash])")
    if impl == "torch-flash" and not torch_flash_available(device):
        raise ValueError(f"impl='torch-flash' needs a CUDA build of torch with FlashAttention and a "
                         f"GPU of compute capability 8.0+; {device} has none")
    if impl in ("flash", "torch-flash"):
        if not flash_ok:
            raise ValueError(f"impl={impl!r} runs fp16/bf16 CUDA tensors with head_dim a multiple of 8 "
                             f"up to 256 only, not {dtype or ''} (head_dim {head_dim}) on {device}")
        name = "flash-attn" if impl == "flash" else "torch-flash"
    elif impl == "auto" and flash_ok and flash_available():
        name = "flash-attn"
    elif impl == "auto" and flash_ok and torch_flash_available(device):
        name = "torch-flash"
    else:
        name = "sdpa"
    if (device.type, name) not in _logged:  # once per device type and path
        _logged.add((device.type, name))
        log.info("pyvattn.attention: %s on %s tensors", name, device.type)
    return name


# --- decode -------------------------------------------------------------------------------------
def decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
           cache_seqlens: torch.Tensor | Sequence[int], *, slots: torch.Tensor | Sequence[int] | None = None,
           softmax_scale: float | None = None, impl: str = "auto") -> torch.Tensor:
    """One decode step for ``B`` requests.

    ``q``: ``[B, 1, Hq, D]``; ``k_cache``/``v_cache``: ``[max_batch, max_seq, Hkv, D]``;
    ``cache_seqlens``: int ``[B]``, the tokens request ``b`` attends to (including the one being
    decoded, whose K/V must already be in the cache); ``slots``: int ``[B]``, the cache row of
    request ``b`` (default ``0..B-1``). Returns ``[B, 1, Hq, D]`` in ``q``'s dtype.
    """
    _check_cache(q, k_cache, v_cache, "q")
    if q.dim() != 4 or q.shape[1] != 1:
        raise ValueError(f"q must be [batch, 1, heads, head_dim], got {tuple(q.shape)}")
    B = q.shape[0]
    lens = _as_index(cache_seqlens, "cache_seqlens", B, q.device)
    slot_t = None if slots is None else _as_index(slots, "slots", B, q.device)
    _check_values(lens, slot_t, k_cache, lo=1)
    scale = _scale(softmax_scale, q.shape[-1])

    name = backend_name(q, impl)
    if name == "flash-attn":
        if slot_t is None:  # rows 0..B-1; a view keeps flash-attn's batch sizes equal
            k_cache, v_cache = k_cache[:B], v_cache[:B]
        return flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=lens, cache_batch_idx=slot_t,
                                       softmax_scale=scale, causal=True)
    if name == "torch-flash":
        cu_q = torch.arange(B + 1, dtype=torch.int32, device=q.device)
        out = _torch_flash(q.reshape(B, *q.shape[2:]), k_cache, v_cache, cu_q, 1, lens, slot_t, scale, False)
        return out.view(q.shape)
    out = torch.empty_like(q)
    lens_h = lens.tolist()
    slots_h = range(B) if slot_t is None else slot_t.tolist()
    for b, (s, n) in enumerate(zip(slots_h, lens_h)):
        out[b] = _sdpa(q[b], k_cache[s, :n], v_cache[s, :n], scale, causal=False)
    return out


# --- prefill ------------------------------------------------------------------------------------
def prefill(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
            cu_seqlens: torch.Tensor | Sequence[int], *, max_seqlen: int | None = None,
            softmax_scale: float | None = None, impl: str = "auto") -> torch.Tensor:
    """Causal self-attention over prompts packed back to back.

    ``q``: ``[T, Hq, D]``; ``k``/``v``: ``[T, Hkv, D]``; ``cu_seqlens``: int ``[B+1]``, request
    ``b`` owns rows ``cu_seqlens[b]:cu_seqlens[b+1]`` (``cu_seqlens[0] == 0``,
    ``cu_seqlens[-1] == T``). ``max_seqlen`` (longest prompt) saves flash-attn a host sync.
    Returns ``[T, Hq, D]``. Store ``k``/``v`` into the cache with :func:`store_kv`.
    """
    _check_heads(q, k, v, "q", "k")
    if q.dim() != 3 or k.shape[0] != q.shape[0]:
        raise ValueError(f"q [tokens, heads, head_dim] and k/v must have the same tokens; "
                         f"got q {tuple(q.shape)}, k {tuple(k.shape)}")
    cu = _cu_seqlens(cu_seqlens, q.shape[0], q.device)
    scale = _scale(softmax_scale, q.shape[-1])
    name = backend_name(q, impl)
    if name in ("flash-attn", "torch-flash"):
        if max_seqlen is None:
            max_seqlen = int((cu[1:] - cu[:-1]).max())
        if name == "flash-attn":
            return flash_attn_varlen_func(q, k, v, cu, cu, max_seqlen, max_seqlen,
                                          softmax_scale=scale, causal=True)
        if q.shape[0] == 0:
            return torch.empty_like(q)
        return torch.ops.aten._flash_attention_forward(
            q.contiguous(), k.contiguous(), v.contiguous(), cu, cu, max_seqlen, max_seqlen, 0.0, True, False,
            scale=scale)[0]
    out = torch.empty_like(q)
    bounds = cu.tolist()
    for a, b in zip(bounds[:-1], bounds[1:]):
        if b > a:
            out[a:b] = _sdpa(q[a:b], k[a:b], v[a:b], scale, causal=True)
    return out


def prefill_with_cache(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                       cu_seqlens_q: torch.Tensor | Sequence[int], cache_seqlens: torch.Tensor | Sequence[int],
                       *, slots: torch.Tensor | Sequence[int] | None = None,
                       softmax_scale: float | None = None, impl: str = "auto") -> torch.Tensor:
    """Chunked prefill: new queries of each request attend to its whole cached sequence, causally.

    ``q``: ``[T, Hq, D]`` packed by ``cu_seqlens_q`` (``[B+1]``); ``cache_seqlens``: ``[B]``,
    request ``b``'s length *including* its ``n_b`` new tokens, whose K/V are already in
    ``cache[slot, L_b - n_b : L_b]``. New query ``j`` sees cache positions ``0 .. L_b - n_b + j``
    (causal, aligned to the end). Returns ``[T, Hq, D]``.
    """
    _check_cache(q, k_cache, v_cache, "q")
    if q.dim() != 3:
        raise ValueError(f"q must be [tokens, heads, head_dim], got {tuple(q.shape)}")
    cu = _cu_seqlens(cu_seqlens_q, q.shape[0], q.device, name="cu_seqlens_q")
    B = cu.numel() - 1
    lens = _as_index(cache_seqlens, "cache_seqlens", B, q.device)
    slot_t = None if slots is None else _as_index(slots, "slots", B, q.device)
    _check_values(lens, slot_t, k_cache, lo=0)
    bounds = cu.tolist()
    counts = [b - a for a, b in zip(bounds[:-1], bounds[1:])]
    lens_h = lens.tolist()
    if any(n > L for n, L in zip(counts, lens_h)):
        raise ValueError("cache_seqlens: every length must include its request's new tokens "
                         "(cache_seqlens[b] >= cu_seqlens_q[b+1] - cu_seqlens_q[b])")
    scale = _scale(softmax_scale, q.shape[-1])

    name = backend_name(q, impl)
    if name == "torch-flash":
        if q.shape[0] == 0:
            return torch.empty_like(q)
        # FlashAttention-2 aligns the causal mask to the end of each request's keys (its
        # seqused_k): new query j sees keys 0 .. L - n + j, as this function promises.
        return _torch_flash(q, k_cache, v_cache, cu, max(counts), lens, slot_t, scale, True)
    if name == "flash-attn":
        # flash_attn_with_kvcache aligns the causal mask bottom-right, so padding each request's
        # queries on the left (not the right) gives every real query row its own causal limit.
        S = max(counts) if counts else 0
        if S == 0:
            return torch.empty_like(q)
        rows = torch.cat([torch.arange(S - n, S) + b * S for b, n in enumerate(counts)]).to(q.device)
        q_pad = q.new_zeros((B * S, *q.shape[1:]))
        q_pad[rows] = q
        if slot_t is None:
            k_cache, v_cache = k_cache[:B], v_cache[:B]
        out = flash_attn_with_kvcache(q_pad.view(B, S, *q.shape[1:]), k_cache, v_cache,
                                      cache_seqlens=lens, cache_batch_idx=slot_t,
                                      softmax_scale=scale, causal=True)
        return out.reshape(B * S, *q.shape[1:])[rows]
    out = torch.empty_like(q)
    slots_h = range(B) if slot_t is None else slot_t.tolist()
    for (a, b), s, L in zip(zip(bounds[:-1], bounds[1:]), slots_h, lens_h):
        if b > a:
            out[a:b] = _sdpa(q[a:b], k_cache[s, :L], v_cache[s, :L], scale, causal=True)
    return out


def store_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             cu_seqlens: torch.Tensor | Sequence[int], start: torch.Tensor | Sequence[int],
             *, slots: torch.Tensor | Sequence[int] | None = None) -> None:
    """Write packed new tokens into the cache: rows ``cu_seqlens[b]:cu_seqlens[b+1]`` of ``k``/``v``
    go to ``cache[slot_b, start[b] : start[b] + n_b]``. The pages must be mapped (``step`` first)."""
    _check_cache(k, k_cache, v_cache, "k", gqa=False)
    if v.shape != k.shape or v.dtype != k.dtype:
        raise ValueError(f"k and v differ: {tuple(k.shape)} {k.dtype} vs {tuple(v.shape)} {v.dtype}")
    cu = _cu_seqlens(cu_seqlens, k.shape[0], k.device)
    B = cu.numel() - 1
    start_h = _as_index(start, "start", B, "cpu").tolist()
    slots_h = list(range(B)) if slots is None else _as_index(slots, "slots", B, "cpu").tolist()
    bounds = cu.tolist()
    for (a, b), s, p in zip(zip(bounds[:-1], bounds[1:]), slots_h, start_h):
        if not 0 <= s < k_cache.shape[0] or p < 0 or p + (b - a) > k_cache.shape[1]:
            raise ValueError(f"store_kv: slot {s}, tokens [{p}, {p + b - a}) do not fit the cache "
                             f"{tuple(k_cache.shape[:2])}")
        k_cache[s, p:p + b - a] = k[a:b]
        v_cache[s, p:p + b - a] = v[a:b]


# --- helpers ------------------------------------------------------------------------------------
def _torch_flash(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, cu_q: torch.Tensor, max_q: int,
                 lens: torch.Tensor, slot_t: torch.Tensor | None, scale: float, causal: bool) -> torch.Tensor:
    """Packed queries ``q [T, Hq, D]`` (request ``b`` owns rows ``cu_q[b]:cu_q[b+1]``) over the
    first ``lens[b]`` rows of cache row ``slots[b]``, through torch's varlen FlashAttention: the
    cache is read as one ``[max_batch * max_seq, Hkv, D]`` sequence whose request ``b`` starts at
    ``slots[b] * max_seq`` and uses ``lens[b]`` keys, so nothing is copied and no row past a
    request's length (perhaps unmapped) is read."""
    B = lens.numel()
    max_batch, max_seq, hkv, D = k_cache.shape
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError("impl='torch-flash' needs contiguous k_cache/v_cache (KVCache's are)")
    if max_batch * max_seq >= 2 ** 31:
        raise ValueError("impl='torch-flash': the cache has over 2**31 token rows (int32 offsets)")
    rows = torch.arange(B, dtype=torch.int32, device=q.device) if slot_t is None else slot_t
    starts = rows * max_seq
    cu_k = torch.cat([starts, starts[-1:] + max_seq]) if B else starts.new_zeros(1)
    return torch.ops.aten._flash_attention_forward(
        q.contiguous(), k_cache.view(-1, hkv, D), v_cache.view(-1, hkv, D), cu_q, cu_k, max_q, max_seq, 0.0,
        causal, False, scale=scale, seqused_k=lens)[0]


_GQA_KW = True  # SDPA's enable_gqa (torch >= 2.5); turned off on the first TypeError


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, causal: bool) -> torch.Tensor:
    """``q [n, Hq, D]`` over ``k/v [L, Hkv, D]`` -> ``[n, Hq, D]``. With ``causal`` and ``L > n``
    the mask is aligned to the end (query j sees keys ``0 .. L - n + j``)."""
    global _GQA_KW
    n, L = q.shape[0], k.shape[0]
    qt, kt, vt = q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None]
    mask, is_causal = None, False
    if causal and n > 1:
        if n == L:
            is_causal = True
        else:
            mask = torch.arange(L, device=q.device)[None, :] <= torch.arange(L - n, L, device=q.device)[:, None]
    groups = q.shape[1] // k.shape[1]
    if groups > 1 and _GQA_KW:
        try:
            out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, is_causal=is_causal,
                                                 scale=scale, enable_gqa=True)
            return out[0].transpose(0, 1)
        except TypeError:
            _GQA_KW = False
    if groups > 1:
        kt, vt = kt.repeat_interleave(groups, dim=1), vt.repeat_interleave(groups, dim=1)
    out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, is_causal=is_causal, scale=scale)
    return out[0].transpose(0, 1)


def _scale(softmax_scale: float | None, head_dim: int) -> float:
    if softmax_scale is None:
        return 1.0 / math.sqrt(head_dim)
    if not isinstance(softmax_scale, (int, float)) or not softmax_scale > 0:
        raise ValueError(f"softmax_scale={softmax_scale!r} must be a positive number")
    return float(softmax_scale)


def _check_heads(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, qname: str, kname: str,
                 gqa: bool = True) -> None:
    for name, t in ((qname, q), (kname, k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if k.shape != v.shape:
        raise ValueError(f"{kname} and v shapes differ: {tuple(k.shape)} vs {tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype) or not q.dtype.is_floating_point:
        raise ValueError(f"{qname}, {kname} and v must share one floating dtype; got {q.dtype}, "
                         f"{k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"{qname}, {kname} and v must be on one device; got {q.device}, {k.device}, {v.device}")
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"head_dim differs: {qname} has {q.shape[-1]}, {kname} has {k.shape[-1]}")
    hq, hkv = q.shape[-2], k.shape[-2]
    if (hq % hkv if gqa else hq != hkv):
        raise ValueError(f"{qname} has {hq} heads, {kname} has {hkv}: "
                         + ("query heads must be a multiple of KV heads" if gqa else "they must match"))


def _check_cache(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, qname: str,
                 gqa: bool = True) -> None:
    _check_heads(q, k_cache, v_cache, qname, "k_cache", gqa)
    if k_cache.dim() != 4:
        raise ValueError(f"k_cache must be [max_batch, max_seq, kv_heads, head_dim], got {tuple(k_cache.shape)}")
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("k_cache/v_cache: the last dimension must be contiguous")


def _as_index(x, name: str, n: int, device) -> torch.Tensor:
    """``x`` as an int32 tensor of ``n`` elements on ``device`` (no copy when it already is)."""
    if isinstance(x, torch.Tensor):
        if x.dtype not in (torch.int32, torch.int64) or x.dim() != 1:
            raise ValueError(f"{name} must be a 1-D int32/int64 tensor, got {x.dtype} {tuple(x.shape)}")
        t = x
    else:
        try:
            t = torch.as_tensor(list(x), dtype=torch.int64)
        except (TypeError, ValueError, RuntimeError):
            raise ValueError(f"{name} must be a sequence of ints") from None
    if t.numel() != n:
        raise ValueError(f"{name} has {t.numel()} entries, expected {n}")
    return t.to(device=device, dtype=torch.int32)


def _check_values(lens: torch.Tensor, slots: torch.Tensor | None, k_cache: torch.Tensor, lo: int) -> None:
    """Range checks, done only for lengths already on the host (no device sync)."""
    max_batch, max_seq = k_cache.shape[:2]
    if slots is None and lens.numel() > max_batch:
        raise ValueError(f"batch of {lens.numel()} requests but the cache has {max_batch} rows; pass slots")
    if lens.device.type == "cpu" and lens.numel():
        if int(lens.min()) < lo or int(lens.max()) > max_seq:
            raise ValueError(f"cache_seqlens must lie in [{lo}, max_seq={max_seq}], got "
                             f"[{int(lens.min())}, {int(lens.max())}]")
    if slots is not None and slots.device.type == "cpu" and slots.numel():
        if int(slots.min()) < 0 or int(slots.max()) >= max_batch:
            raise ValueError(f"slots must lie in [0, {max_batch})")


def _cu_seqlens(cu, total: int, device, name: str = "cu_seqlens") -> torch.Tensor:
    """``cu`` as int32 on ``device``. Values are checked when they are on the host; a tensor already
    on the GPU is taken as is (reading it back would synchronize)."""
    if isinstance(cu, torch.Tensor):
        if cu.dim() != 1 or cu.dtype not in (torch.int32, torch.int64) or cu.numel() < 2:
            raise ValueError(f"{name} must be a 1-D int32/int64 tensor of at least 2 entries")
        if cu.device.type != "cpu":
            return cu.to(device=device, dtype=torch.int32)
        host = cu.tolist()
    else:
        host = list(cu)
    if len(host) < 2 or host[0] != 0 or host[-1] != total or any(b < a for a, b in zip(host, host[1:])):
        raise ValueError(f"{name} must start at 0, never decrease and end at the token count {total}; "
                         f"got {host[:6]}{'...' if len(host) > 6 else ''}")
    return torch.tensor(host, dtype=torch.int32, device=device)


__all__ = ["IMPLS", "backend_name", "decode", "flash_available", "prefill", "prefill_with_cache", "store_kv",
           "torch_flash_available"]

"""A minimal continuous-batching engine on pyvattn, written to be read by engine authors.

One :meth:`Engine.step` is one forward pass of a transformers decoder-only model over a packed
batch that mixes decode tokens of running requests with prompt chunks of new ones::

    scheduler          KVCache                      model forward (transformers modules)
    ---------          -------                      -------------------------------------
    running: 1 token   step({slot: computed + n})   q/k/v projections, RoPE, norms: transformers'
    each (decode)      maps the pages all layers    cache.update(k, v, layer)  -> written in place
    waiting: admit     need, in one call, or raises   into k[layer][slot, pos] (one index_put)
    while slots,       OutOfPages having mapped     attention "pyvattn"        -> pyvattn.attention
    token budget and   nothing: the scheduler         .prefill_with_cache over the cache rows,
    memory allow       waits or preempts            read in place (no block table, no gather)

What pyvattn changes for an engine, compared with a paged one: there is no block table to build,
no block allocator to consult per token, and the attention kernel reads each request's rows of a
plain ``[max_batch, max_seq, kv_heads, head_dim]`` tensor. Memory is still committed only as
requests grow: ``KVCache.step`` maps pages under the slabs, and is all-or-nothing, so admission
control is "try to step; on ``OutOfPages`` wait (new requests) or preempt (running ones)".

Policies (deliberately simple): first come first served; decode tokens are scheduled before
prompt chunks; prompts are split into chunks to fit ``max_batched_tokens`` (chunked prefill);
preemption frees the newest running request's slot and recomputes it later (its tokens so far
become its prompt), as vLLM's recompute preemption does. Decoding is greedy. Each request's
output is the one it gets generated alone (``tests/test_engine.py`` checks this against
transformers' own generate, request by request).
"""

from __future__ import annotations

import contextlib
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import torch
from transformers import AttentionInterface

from . import attention
from .errors import OutOfPages
from .integrations.transformers import cache_shape
from .kvcache import KVCache

ATTENTION_NAME = "pyvattn"


@dataclass(eq=False)
class Request:
    """A generation request and its progress. ``tokens`` = prompt + output; the first ``computed``
    of them have their K/V in the cache (in ``slot``)."""

    rid: int
    prompt: list[int]
    max_new_tokens: int
    arrival_s: float = 0.0
    output: list[int] = field(default_factory=list)
    slot: int | None = None
    computed: int = 0
    preemptions: int = 0
    finished_s: float | None = None

    @property
    def tokens(self) -> list[int]:
        return self.prompt + self.output

    @property
    def pending(self) -> int:
        """Tokens whose K/V the cache lacks: the prompt (or what a preemption dropped), else 1."""
        return len(self.prompt) + len(self.output) - self.computed

    @property
    def done(self) -> bool:
        return len(self.output) >= self.max_new_tokens


@dataclass
class Batch:
    """One forward pass: request ``i`` contributes tokens ``[starts[i], starts[i] + counts[i])``,
    packed back to back. Passed to the model as its ``cache`` (``update`` writes K/V into the
    KVCache) and to the attention function (which reads them back from it)."""

    kv: KVCache
    requests: list[Request]
    counts: list[int]
    slots: torch.Tensor  # [B] cache row of each request
    cu_seqlens: torch.Tensor  # [B+1] packed query offsets
    seqlens: torch.Tensor  # [B] tokens in the cache once this pass has written
    token_slot: torch.Tensor  # [T] row of each packed token
    token_pos: torch.Tensor  # [T] position of each packed token

    @classmethod
    def build(cls, kv: KVCache, plan: list[tuple[Request, int]]) -> "Batch":
        requests = [r for r, _ in plan]
        counts = [n for _, n in plan]
        starts = [r.computed for r in requests]
        device = kv.device
        slots = torch.tensor([r.slot for r in requests], dtype=torch.int64)
        pos = torch.cat([torch.arange(s, s + n) for s, n in zip(starts, counts)])
        cu = torch.tensor([0] + counts).cumsum(0)
        return cls(kv, requests, counts, slots.to(device), cu.to(device, torch.int32),
                   torch.tensor([s + n for s, n in zip(starts, counts)], dtype=torch.int32, device=device),
                   slots.repeat_interleave(torch.tensor(counts)).to(device), pos.to(device))

    def input_ids(self) -> torch.Tensor:
        ids = [t for r, n in zip(self.requests, self.counts) for t in r.tokens[r.computed:r.computed + n]]
        return torch.tensor([ids], dtype=torch.long, device=self.kv.device)

    def sampled(self) -> list[int]:
        """Packed index of the last token of each request that reaches its end in this pass (its
        logits give the next token); requests in mid-prompt sample nothing."""
        ends = self.cu_seqlens[1:].tolist()
        return [end - 1 for r, n, end in zip(self.requests, self.counts, ends) if r.computed + n == len(r.tokens)]

    # transformers calls this as the model's cache, once per layer
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        """Write this pass's keys/values (``[1, kv_heads, T, head_dim]``) to their rows and positions."""
        self.kv.k[layer_idx][self.token_slot, self.token_pos] = key_states[0].transpose(0, 1)
        self.kv.v[layer_idx][self.token_slot, self.token_pos] = value_states[0].transpose(0, 1)
        return key_states, value_states


def _pyvattn_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                       pyvattn_batch: Batch | None = None, **kwargs):
    """transformers attention function: packed queries ``[1, Hq, T, D]`` over the cache rows of
    their requests (``pyvattn.attention.prefill_with_cache``, causal, in place). Returns
    ``([1, T, Hq, D], None)``; ``key``/``value`` are not read, the cache holds them."""
    if pyvattn_batch is None:
        raise ValueError("the 'pyvattn' attention runs inside pyvattn.engine.Engine (no batch given)")
    kv, layer = pyvattn_batch.kv, module.layer_idx
    q = query[0].transpose(0, 1).contiguous()
    out = attention.prefill_with_cache(q, kv.k[layer], kv.v[layer], pyvattn_batch.cu_seqlens,
                                       pyvattn_batch.seqlens, slots=pyvattn_batch.slots, softmax_scale=scaling)
    return out.unsqueeze(0), None


AttentionInterface.register(ATTENTION_NAME, _pyvattn_attention)


class Scheduler:
    """Which requests run in the next pass and how many tokens each, within the token budget,
    the free slots and the memory ``KVCache.step`` can map."""

    def __init__(self, kv: KVCache, max_batched_tokens: int):
        self.kv = kv
        self.max_batched_tokens = max_batched_tokens
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # oldest first
        self.preemptions = 0

    def schedule(self, now: float) -> list[tuple[Request, int]]:
        plan = self._grow_running()
        budget = self.max_batched_tokens - sum(n for _, n in plan)
        arrived = []  # (request, tokens) that the budget and the free slots allow, in queue order
        for req in self.waiting:
            if budget <= 0 or req.arrival_s > now or len(self.running) + len(arrived) >= self.kv.max_batch_size:
                break
            arrived.append((req, min(req.pending, budget)))
            budget -= arrived[-1][1]
        admitted = self._admit_all(arrived) or self._admit_each(arrived)
        if arrived and not admitted and not self.running:
            req = arrived[0][0]
            raise OutOfPages(f"request {req.rid} ({len(req.tokens)} tokens) does not fit the KV memory "
                             f"even alone: raise memory_budget or lower max_batched_tokens")
        for _ in admitted:
            self.waiting.popleft()
        return plan + admitted

    def _grow_running(self) -> list[tuple[Request, int]]:
        """Map the next tokens of running requests (decode: 1; an unfinished prompt: a chunk),
        preempting the newest while their growth does not fit."""
        while True:
            plan, budget = [], self.max_batched_tokens
            for req in self.running:
                n = min(req.pending, budget)
                if n:
                    plan.append((req, n))
                    budget -= n
            try:
                self.kv.step({r.slot: r.computed + n for r, n in plan})
                return plan
            except OutOfPages as exc:
                if len(self.running) == 1:
                    raise OutOfPages(f"request {self.running[0].rid} cannot grow to {plan[0][0].computed + plan[0][1]} "
                                     f"tokens even alone: raise memory_budget ({exc})",
                                     needed=exc.needed, available=exc.available) from None
                self.preempt(self.running[-1])

    def _admit_all(self, arrived: list[tuple[Request, int]]) -> list[tuple[Request, int]]:
        """Slots for all of ``arrived`` with their first chunks mapped in one ``step`` (one
        backend call), or none of them."""
        if not arrived:
            return []
        slots = [self.kv.alloc_slot(min(len(r.tokens), self.kv.max_seq_len)) for r, _ in arrived]
        try:
            self.kv.step({slot: n for slot, (_, n) in zip(slots, arrived)})
        except OutOfPages:
            for slot in slots:
                self.kv.free_slot(slot)
            return []
        for slot, (req, _) in zip(slots, arrived):
            req.slot = slot  # best fit among slots whose pages are still mapped
            self.running.append(req)
        return arrived

    def _admit_each(self, arrived: list[tuple[Request, int]]) -> list[tuple[Request, int]]:
        """As many of ``arrived`` as memory allows, in order; the rest wait for memory to free.
        ``can_admit`` answers ahead of time, so a request that does not fit costs no slot claimed
        and freed again."""
        admitted = []
        for item in arrived:
            if not self.kv.can_admit(item[1]) or not self._admit_all([item]):
                break
            admitted.append(item)
        return admitted

    def preempt(self, req: Request) -> None:
        """Free ``req``'s slot; it goes back to the front of the queue and is recomputed."""
        self.running.remove(req)
        self.kv.free_slot(req.slot)
        req.slot, req.computed = None, 0
        req.preemptions += 1
        self.preemptions += 1
        self.waiting.appendleft(req)

    def finish(self, req: Request) -> None:
        self.running.remove(req)
        self.kv.free_slot(req.slot)
        req.slot = None


class Engine:
    """Continuous batching of greedy generation for a transformers decoder-only model whose KV
    cache is a :class:`pyvattn.KVCache` (``Engine.for_model`` builds one to fit the model).

    ``submit()`` queues requests; each ``step()`` runs one forward pass and returns the requests it
    finished; ``run()`` steps until every request is done. A pass that raises (Ctrl-C included)
    advances no request: the tokens it was computing are computed again by the next ``step()``.
    """

    def __init__(self, model, kv: KVCache, max_batched_tokens: int = 512, eos_token_id: int | None = None):
        num_layers, kv_heads, head_dim = cache_shape(model.config)
        if (kv.num_layers, kv.num_kv_heads, kv.head_dim) != (num_layers, kv_heads, head_dim):
            raise ValueError(f"kv: the KVCache has {kv.num_layers} layers x {kv.num_kv_heads} KV heads x "
                             f"{kv.head_dim}; the model needs {num_layers} x {kv_heads} x {head_dim}")
        window = getattr(model.config, "sliding_window", None)
        if window is not None and window < kv.max_seq_len and "sliding_attention" in \
                (getattr(model.config, "layer_types", None) or ["sliding_attention"]):
            raise ValueError(f"model: sliding window of {window} tokens; pyvattn.attention has no window "
                             f"(use a full-attention config, or max_seq_len <= {window})")
        if isinstance(max_batched_tokens, bool) or not isinstance(max_batched_tokens, int) or max_batched_tokens < 1:
            raise ValueError(f"max_batched_tokens={max_batched_tokens!r} must be a positive integer")
        self.model = model
        self.kv = kv
        self.eos_token_id = eos_token_id
        self.scheduler = Scheduler(kv, max_batched_tokens)
        self.steps = 0
        self.generated_tokens = 0
        self._next_rid = 0
        self._t0 = time.monotonic()

    @classmethod
    def for_model(cls, model, max_batch_size: int, max_seq_len: int, max_batched_tokens: int = 512,
                  eos_token_id: int | None = None, **kvcache_options) -> "Engine":
        """An engine with its own KVCache shaped for ``model`` (dtype and device of its weights);
        ``kvcache_options`` (``memory_budget``, ``page_size``, ``backend``, ...) go to KVCache.
        ``close()`` releases that cache."""
        num_layers, kv_heads, head_dim = cache_shape(model.config)
        param = next(model.parameters())
        kv = KVCache(num_layers, kv_heads, head_dim, max_batch_size, max_seq_len, dtype=param.dtype,
                     device=param.device, **kvcache_options)
        try:
            return cls(model, kv, max_batched_tokens, eos_token_id)
        except BaseException:
            kv.close()
            raise

    # --- requests ---------------------------------------------------------------------------------
    def submit(self, prompt: Sequence[int], max_new_tokens: int, arrival_s: float = 0.0) -> Request:
        """Queue a request (token ids); it is admitted once ``arrival_s`` (seconds after the engine
        was made) has passed. ``ValueError`` if it can never fit ``max_seq_len``."""
        prompt = [int(t) for t in prompt]
        if not prompt:
            raise ValueError("prompt: at least one token")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={max_new_tokens!r} must be a positive integer")
        if len(prompt) + max_new_tokens - 1 > self.kv.max_seq_len:
            raise ValueError(f"prompt of {len(prompt)} + max_new_tokens={max_new_tokens} exceed "
                             f"max_seq_len={self.kv.max_seq_len}")
        req = Request(self._next_rid, prompt, max_new_tokens, float(arrival_s))
        self._next_rid += 1
        self.scheduler.waiting.append(req)
        return req

    @property
    def has_work(self) -> bool:
        return bool(self.scheduler.waiting or self.scheduler.running)

    # --- the loop ---------------------------------------------------------------------------------
    def step(self) -> list[Request]:
        """Schedule, run one forward pass, sample; return the requests that finished."""
        now = time.monotonic() - self._t0
        plan = self.scheduler.schedule(now)
        if not plan:
            if self.scheduler.waiting:  # nothing runnable before the next arrival
                time.sleep(max(0.0, min(0.05, self.scheduler.waiting[0].arrival_s - now)))
            return []
        batch = Batch.build(self.kv, plan)
        next_tokens = self._forward(batch)
        self.steps += 1
        done = []
        sampled = iter(next_tokens)
        for req, n in plan:  # only now, after the pass succeeded, do requests advance
            req.computed += n
            if req.computed == len(req.tokens):
                token = next(sampled)
                req.output.append(token)
                self.generated_tokens += 1
                if req.done or token == self.eos_token_id:
                    req.finished_s = time.monotonic() - self._t0
                    self.scheduler.finish(req)
                    done.append(req)
        return done

    @torch.inference_mode()
    def _forward(self, batch: Batch) -> list[int]:
        ids = batch.input_ids()
        keep = torch.tensor(batch.sampled(), dtype=torch.long, device=ids.device)
        with self._attention_implementation(ATTENTION_NAME):
            out = self.model(input_ids=ids, position_ids=batch.token_pos[None], cache=batch, use_cache=True,
                             pyvattn_batch=batch, logits_to_keep=keep)
        return out.logits[0].argmax(-1).tolist()

    @contextlib.contextmanager
    def _attention_implementation(self, name: str):
        """The model's attention runs through ``name`` for one pass, and is left as it was."""
        config = self.model.config
        before = config._attn_implementation
        config._attn_implementation = name
        try:
            yield
        finally:
            config._attn_implementation = before

    def run(self, requests: Iterable[tuple[Sequence[int], int]] = (), progress=None) -> list[Request]:
        """Submit ``(prompt, max_new_tokens)`` pairs, then step until every request is done.
        ``progress(engine, finished)`` is called after each step. Returns the requests submitted
        here, in order."""
        mine = [self.submit(prompt, n) for prompt, n in requests]
        while self.has_work:
            finished = self.step()
            if progress is not None:
                progress(self, finished)
        return mine

    def stats(self) -> dict:
        """Engine counters next to the KVCache's."""
        return {"steps": self.steps, "generated_tokens": self.generated_tokens,
                "running": len(self.scheduler.running), "waiting": len(self.scheduler.waiting),
                "preemptions": self.scheduler.preemptions, **self.kv.stats()}

    def close(self) -> None:
        self.kv.close()

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


__all__ = ["ATTENTION_NAME", "Batch", "Engine", "Request", "Scheduler"]

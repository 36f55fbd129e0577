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
become its prompt), as vLLM's recompute preemption does. Prefix caching (on by default, as in
vLLM v1): a request is admitted with ``KVCache.alloc_slot(tokens=...)`` and its prefill starts at
``cached_tokens(slot)``, the whole pages of its tokens that another request wrote (a shared system
prompt; a preempted request's own tokens), read in place. Decoding is greedy. Each request's
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
from .backends.base import Undo, undo_one
from .errors import OutOfPages, note_cleanup_failure
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
    the free slots and the memory ``KVCache.step`` can map.

    With ``prefix_caching``, a request is admitted with ``alloc_slot(tokens=its tokens)``: it
    starts at ``cached_tokens(slot)`` (whole pages another request wrote: a finished one's slot
    taken over in place, or a running one's pages shared), and only the tokens left count against
    the budget. Prefixes are looked up before this pass steps anything, so every page found holds
    written K/V: a request's stepped length equals what it wrote between passes (a pass that
    fails has its requests preempted, see ``abandon``), and a freed slot's findable prefix is
    what its request wrote (``free_slot(written=...)``).
    """

    def __init__(self, kv: KVCache, max_batched_tokens: int, prefix_caching: bool = True):
        self.kv = kv
        self.max_batched_tokens = max_batched_tokens
        self.prefix_caching = prefix_caching
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # oldest first
        self.preemptions = 0
        self.admissions = 0
        self.prefix_hits = 0  # admissions that found at least one page of their tokens cached
        self.prefill_tokens = 0  # tokens admissions left to compute (prompt, or all a preemption dropped)
        self.prefill_tokens_saved = 0  # tokens admissions found cached

    def schedule(self, now: float) -> list[tuple[Request, int]]:
        budget = self.max_batched_tokens - sum(n for _, n in self._running_plan())
        claimed = self._claim_arrivals(now, budget)
        plan = []
        try:
            plan = self._grow_running(claimed)
            self._admit_all(claimed) or self._admit_each(claimed)
        except BaseException as exc:  # a pass that fails before it runs: what was stepped is not written
            raise undo_one(exc, self.abandon, plan + self._settle(claimed, exc))
        admitted = self._settle(claimed)
        if claimed and not admitted and not self.running:
            req = claimed[0][0]
            raise OutOfPages(f"request {req.rid} ({len(req.tokens)} tokens) does not fit the KV memory "
                             f"even alone: raise memory_budget or lower max_batched_tokens")
        return plan + admitted

    def _running_plan(self) -> list[tuple[Request, int]]:
        """The next tokens of running requests (decode: 1; an unfinished prompt: a chunk), oldest
        first, within the token budget."""
        plan, budget = [], self.max_batched_tokens
        for req in self.running:
            n = min(req.pending, budget)
            if n:
                plan.append((req, n))
                budget -= n
        return plan

    def _claim_arrivals(self, now: float, budget: int) -> list[tuple[Request, int]]:
        """Slots for the requests that have arrived, in queue order, while the free slots and
        ``budget`` allow, each with the tokens of its first chunk (what its cached prefix leaves).
        Nothing is stepped: on any error every slot claimed here is freed again."""
        claimed: list[tuple[Request, int]] = []
        try:
            for req in self.waiting:
                if budget <= 0 or req.arrival_s > now or len(self.running) + len(claimed) >= self.kv.max_batch_size:
                    break
                tokens = req.tokens
                req.slot = self.kv.alloc_slot(min(len(tokens), self.kv.max_seq_len),
                                              tokens=tokens if self.prefix_caching else None)
                claimed.append((req, 0))
                req.computed = self.kv.cached_tokens(req.slot)
                claimed[-1] = (req, min(req.pending, budget))
                budget -= claimed[-1][1]
        except BaseException as exc:
            self._release(claimed, exc)
            raise
        return claimed

    def _grow_running(self, claimed: list[tuple[Request, int]]) -> list[tuple[Request, int]]:
        """Map the next tokens of running requests, preempting the newest while their growth does
        not fit. Memory short: the slots ``claimed`` for arrivals are given back first (emptying
        ``claimed``), since their prefixes pin pages reclaim could otherwise take."""
        while True:
            plan = self._running_plan()
            try:
                self.kv.step({r.slot: r.computed + n for r, n in plan})
                return plan
            except OutOfPages as exc:
                if claimed:
                    self._release(claimed)
                    claimed.clear()
                    continue
                if len(self.running) == 1:
                    raise OutOfPages(f"request {self.running[0].rid} cannot grow to {plan[0][0].computed + plan[0][1]} "
                                     f"tokens even alone: raise memory_budget ({exc})",
                                     needed=exc.needed, available=exc.available) from None
                self.preempt(self.running[-1])

    def _admit_all(self, claimed: list[tuple[Request, int]]) -> bool:
        """All of ``claimed`` running, their first chunks mapped in one ``step`` (one backend
        call), or none of them (False on ``OutOfPages``)."""
        if not claimed:
            return False
        try:
            self.kv.step({r.slot: r.computed + n for r, n in claimed})
        except OutOfPages:
            return False
        self.running.extend(r for r, _ in claimed)
        return True

    def _admit_each(self, claimed: list[tuple[Request, int]]) -> None:
        """As many of ``claimed`` running as memory allows, in order."""
        for item in claimed:
            if not self._admit_all([item]):
                break

    def _settle(self, claimed: list[tuple[Request, int]], exc: BaseException | None = None) -> list:
        """After admission (or an error in it): the claimed requests that now run leave the queue
        and are counted; the slots of the rest are freed and they wait, as they were. Returns the
        admitted ``(request, tokens)``."""
        running = set(map(id, self.running))
        admitted = [item for item in claimed if id(item[0]) in running]  # a prefix of claimed
        for req, _ in admitted:
            assert self.waiting[0] is req  # claimed from the front; preemption gave their slots back
            self.waiting.popleft()
            self.admissions += 1
            self.prefix_hits += req.computed > 0
            self.prefill_tokens += req.pending
            self.prefill_tokens_saved += req.computed
        self._release(claimed[len(admitted):], exc)
        return admitted

    def _release(self, claimed: list[tuple[Request, int]], exc: BaseException | None = None) -> None:
        """Free the slots of requests claimed but not admitted; they stay waiting, as they were.
        Every slot is freed even if one fails; the first failure is raised (or noted on ``exc``)."""
        undo = Undo()
        for req, _ in claimed:
            if req.slot is not None:
                undo.attempt(self.kv.free_slot, req.slot, req.computed)
            req.slot, req.computed = None, 0
        if exc is None:
            undo.raise_first()
        elif undo.errors:
            note_cleanup_failure(exc, "freeing the slots of requests not admitted", undo.errors[0])

    def preempt(self, req: Request) -> None:
        """Free ``req``'s slot; it goes back to the front of the queue and is recomputed (from the
        prefix of its own that it finds still cached, with prefix caching)."""
        self.running.remove(req)
        self.kv.free_slot(req.slot, req.computed)
        req.slot, req.computed = None, 0
        req.preemptions += 1
        self.preemptions += 1
        self.waiting.appendleft(req)

    def abandon(self, plan: list[tuple[Request, int]]) -> None:
        """After a pass over ``plan`` failed: its requests were stepped past what they wrote, so
        with prefix caching they are preempted (newest first, keeping their order in the queue),
        freeing their slots with only what they wrote findable. Without it they stay running."""
        if not self.prefix_caching:
            return
        for req in sorted((r for r, _ in plan if r in self.running), key=self.running.index, reverse=True):
            self.preempt(req)

    def finish(self, req: Request) -> None:
        self.running.remove(req)
        self.kv.free_slot(req.slot)
        req.slot = None


class Engine:
    """Continuous batching of greedy generation for a transformers decoder-only model whose KV
    cache is a :class:`pyvattn.KVCache` (``Engine.for_model`` builds one to fit the model).

    ``submit()`` queues requests; each ``step()`` runs one forward pass and returns the requests it
    finished; ``run()`` steps until every request is done. A pass that raises (Ctrl-C included)
    advances no request: the tokens it was computing are computed again by the next ``step()``
    (with ``prefix_caching``, its requests are preempted and resume from what they wrote).

    ``prefix_caching`` (default True): admissions reuse the cached prefix of a request's tokens
    (see :class:`Scheduler`). The cached K/V are those the request would compute itself (same
    tokens, same positions; in low precision up to the rounding any other batching changes too);
    off, every prompt is computed from its first token.
    """

    def __init__(self, model, kv: KVCache, max_batched_tokens: int = 512, eos_token_id: int | None = None,
                 prefix_caching: bool = True):
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
        if not isinstance(prefix_caching, bool):
            raise ValueError(f"prefix_caching={prefix_caching!r} must be True or False")
        self.model = model
        self.kv = kv
        self.eos_token_id = eos_token_id
        self.scheduler = Scheduler(kv, max_batched_tokens, prefix_caching)
        self.steps = 0
        self.generated_tokens = 0
        self._next_rid = 0
        self._t0 = time.monotonic()

    @classmethod
    def for_model(cls, model, max_batch_size: int, max_seq_len: int, max_batched_tokens: int = 512,
                  eos_token_id: int | None = None, prefix_caching: bool = True, **kvcache_options) -> "Engine":
        """An engine with its own KVCache shaped for ``model`` (dtype and device of its weights);
        ``kvcache_options`` (``memory_budget``, ``page_size``, ``backend``, ...) go to KVCache.
        ``close()`` releases that cache."""
        num_layers, kv_heads, head_dim = cache_shape(model.config)
        param = next(model.parameters())
        kv = KVCache(num_layers, kv_heads, head_dim, max_batch_size, max_seq_len, dtype=param.dtype,
                     device=param.device, **kvcache_options)
        try:
            return cls(model, kv, max_batched_tokens, eos_token_id, prefix_caching)
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
        try:
            next_tokens = self._forward(batch)
        except BaseException as exc:
            raise undo_one(exc, self.scheduler.abandon, plan)
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
        """Engine counters next to the KVCache's. ``prefill_tokens``: tokens admissions left to
        compute (a prompt, or what a preemption dropped); ``prefill_tokens_saved``: tokens they
        found cached instead (prefix caching), in ``prefix_cache_hits`` of ``admissions``."""
        sched = self.scheduler
        return {"steps": self.steps, "generated_tokens": self.generated_tokens,
                "running": len(sched.running), "waiting": len(sched.waiting), "preemptions": sched.preemptions,
                "admissions": sched.admissions, "prefix_cache_hits": sched.prefix_hits,
                "prefill_tokens": sched.prefill_tokens, "prefill_tokens_saved": sched.prefill_tokens_saved,
                **self.kv.stats()}

    def close(self) -> None:
        self.kv.close()

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


__all__ = ["ATTENTION_NAME", "Batch", "Engine", "Request", "Scheduler"]

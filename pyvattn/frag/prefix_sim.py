"""The serving loop of :mod:`.simulate` (vLLM's admission, decode growth, recompute preemption,
watermark) over a :class:`~.prefix.PrefixPool`: each admission takes the longest cached prefix of
its prompt and prefills only the rest.

Differences from :func:`.simulate.serve`, all from vLLM's prefix caching: admission checks what
the request costs after its cache hits (shared units already referenced cost nothing), a request
that finishes or is preempted leaves its shareable units in the cache (a re-admitted request can
hit its own prompt), and growth evicts cached units before it preempts. Runs of steps in which
only growth happens are jumped as in :mod:`.simulate`. Per-step memory is counted in units of the
pool: *in use* is what running requests reference (a shared unit once), *cached* what the cache
retains, *unshared* what the running requests would hold without sharing.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import numpy as np

from .prefix import PrefixPool, UnitKeys
from .simulate import REJECT_BUDGET, REJECT_CONTEXT, ServePolicy, ServingLoop, SimulationStuck, arrival_steps
from .traces import Trace

_MAX_JUMP = 2048  # steps looked at by one jump: bounds a (requests x steps) array


@dataclass
class PrefixResult:
    """Outcomes of one run. Memory sums are in units per region, summed over steps."""

    scheme: str
    sharing: bool
    unit_bytes: int  # of all regions: one unit in every layer's K and V
    steps: int = 0
    served: int = 0
    rejected: dict[str, int] = field(default_factory=lambda: {REJECT_CONTEXT: 0, REJECT_BUDGET: 0})
    preemptions: int = 0
    admissions: int = 0
    prompts_with_hit: int = 0  # first admissions that found part of their prompt in the cache
    prompt_tokens: int = 0  # first admissions' prompts
    prefill_tokens: int = 0  # filled at admission (prompts, and prompt + generated after preemption)
    saved_tokens: int = 0  # of those, found in the cache
    saved_prompt_tokens: int = 0  # of those, at first admissions: shared with earlier requests
    unbounded_tokens: int = 0  # what first admissions would share if nothing were evicted
    evictions: int = 0
    sum_in_use: int = 0
    sum_cached: int = 0
    sum_unshared: int = 0
    sum_running: int = 0
    peak_in_use: int = 0
    max_running: int = 0

    @property
    def rejected_total(self) -> int:
        return sum(self.rejected.values())

    def add_steps(self, in_use, cached, unshared, running: int) -> None:
        """Steps with these units (scalars for one step, arrays for a run of steps)."""
        k = np.size(in_use)
        self.steps += k
        self.sum_in_use += int(np.sum(in_use))
        self.sum_cached += int(np.sum(cached))
        self.sum_unshared += int(np.sum(unshared))
        self.sum_running += running * k
        self.peak_in_use = max(self.peak_in_use, int(np.max(in_use)))
        self.max_running = max(self.max_running, running)

    def summary(self) -> dict:
        """What the table and the JSON show (bytes over all regions)."""
        steps, unit = max(1, self.steps), self.unit_bytes
        return {
            "scheme": self.scheme, "sharing": self.sharing, "unit_bytes": unit, "steps": self.steps,
            "served": self.served, "rejected": sum(self.rejected.values()),
            "rejected_by_reason": dict(self.rejected), "preemptions": self.preemptions,
            "admissions": self.admissions, "prompts_with_hit": self.prompts_with_hit,
            "prompt_tokens": self.prompt_tokens, "prefill_tokens": self.prefill_tokens,
            "saved_tokens": self.saved_tokens,
            "saved_fraction": self.saved_tokens / self.prefill_tokens if self.prefill_tokens else 0.0,
            "saved_prompt_tokens": self.saved_prompt_tokens,
            "saved_prompt_fraction": self.saved_prompt_tokens / self.prompt_tokens if self.prompt_tokens else 0.0,
            "saved_recompute_tokens": self.saved_tokens - self.saved_prompt_tokens,
            "unbounded_tokens": self.unbounded_tokens,
            "computed_tokens": self.prefill_tokens - self.saved_tokens, "evictions": self.evictions,
            "mean_in_use_bytes": self.sum_in_use * unit / steps, "peak_in_use_bytes": self.peak_in_use * unit,
            "mean_cached_bytes": self.sum_cached * unit / steps,
            "mean_shared_saving_bytes": (self.sum_unshared - self.sum_in_use) * unit / steps,
            "mean_concurrent": self.sum_running / steps, "max_concurrent": self.max_running,
            "requests_per_step": self.served / steps,
        }


def serve_shared(trace: Trace, chains: list[np.ndarray], keys: UnitKeys, capacity: int, policy: ServePolicy,
                 scheme: str = "", unit_bytes: int = 0, progress=None, on_step=None) -> PrefixResult:
    """Run ``trace`` (with each request's hash ``chains``) over a pool of ``capacity`` units per
    region of the scheme ``keys`` describes, under ``policy``. ``progress(k)`` is called as
    requests finish; ``on_step(step, server)`` after every executed (not jumped) step."""
    return _SharedServer(trace, chains, keys, capacity, policy, scheme, unit_bytes, progress, on_step).run()


class _SharedServer(ServingLoop):
    """One run: batch slots, queue, pool; one method per phase of a step, as in :mod:`.simulate`."""

    def __init__(self, trace, chains, keys, capacity, policy, scheme, unit_bytes, progress, on_step):
        self.n, self.chains, self.unit, self.policy = len(trace), chains, keys, policy
        self.pool = PrefixPool(capacity)
        self.progress, self.on_step = progress, on_step
        self.total, self.prompt = trace.total, trace.prompt
        self.resume = trace.prompt.copy()
        self.arrive = arrival_steps(trace, policy.arrival_step_seconds)
        self.order = np.argsort(self.arrive, kind="stable")
        self.watermark = int(policy.watermark * capacity)
        self.beyond = self.total > policy.max_context
        self.never = ~self.beyond & (keys.units_for(np.minimum(self.total, policy.max_context))
                                     + self.watermark > capacity)
        self.out = PrefixResult(scheme, keys.shareable, unit_bytes)
        self.waiting: deque[int] = deque()
        self.running: list[int] = []  # requests, in admission order (the last is preempted first)
        self.length = np.zeros(self.n, dtype=np.int64)
        self.held = np.zeros(self.n, dtype=np.int64)  # units each running request references
        self.private = np.zeros(self.n, dtype=np.int64)
        self.keys: dict[int, list[int]] = {}  # running request -> its shareable keys
        self.admitted_once = np.zeros(self.n, dtype=bool)
        self.next_arrival = self.step = self.finished = self.reported = 0
        self.stuck = False
        self.report_every = max(1, self.n // 1000)

    def run(self) -> PrefixResult:
        self._serve()
        self.out.evictions = self.pool.evictions
        return self.out

    def _decode(self) -> bool:
        """Every running request grows by one token; the newest are preempted until that fits."""
        running, preempted = self.running, False
        if not running:
            return False
        while True:
            idx = np.array(running)
            need = np.maximum(self.unit.units_for(self.length[idx] + 1) - self.held[idx], 0)
            if int(need.sum()) <= self.pool.available():
                break
            if len(running) == 1:
                raise SimulationStuck(f"{self.out.scheme}: step {self.step}: request {running[0]} "
                                      f"does not fit the memory alone")
            self._release(running.pop())
            preempted = True
        added = int(need.sum())
        if added:
            self.pool.grow_private(added)
            self.held[idx] += need
            self.private[idx] += need
        self.length[idx] += 1
        return preempted

    def _release(self, r: int, preempted: bool = True) -> None:
        self.pool.release(self.keys.pop(r), int(self.private[r]))
        self.held[r] = self.private[r] = 0
        if preempted:
            self.waiting.appendleft(r)
            self.resume[r] = self.length[r]
            self.out.preemptions += 1

    def _admit(self, preempted: bool) -> None:
        """In order, while a slot is free and the request's cost after its cache hits leaves the
        watermark free. The head that failed keeps failing until something is freed (the cache
        only shrinks meanwhile, so its cost only grows)."""
        if preempted:
            self.stuck = False
            return
        pool, unit, out = self.pool, self.unit, self.out
        while self.waiting and not self.stuck and len(self.running) < self.policy.max_batch:
            r = self.waiting[0]
            tokens = int(self.resume[r])
            keys = unit.keys(self.chains[r], int(self.prompt[r]))
            hits = pool.hits(keys, unit.max_hits(tokens))
            units = int(unit.units_for(tokens))
            if pool.available() - pool.cost(keys, hits, units) < self.watermark:
                self.stuck = True
                break
            self.waiting.popleft()
            self.keys[r] = held = pool.acquire(keys, hits, units)
            self.private[r] = units - len(held)
            self.held[r], self.length[r] = units, tokens
            self.running.append(r)
            saved = unit.tokens(hits)
            out.admissions += 1
            out.prefill_tokens += tokens
            out.saved_tokens += saved
            if not self.admitted_once[r]:
                self.admitted_once[r] = True
                out.prompt_tokens += int(self.prompt[r])
                out.saved_prompt_tokens += saved
                out.prompts_with_hit += saved > 0
        if self.waiting and len(self.running) >= self.policy.max_batch:
            self.stuck = True

    def _record(self) -> None:
        pool, idx = self.pool, self.running
        self.out.add_steps(pool.referenced, len(pool.cached), int(self.held[idx].sum()) if idx else 0, len(idx))
        if self.on_step is not None:
            self.on_step(self.step, self)

    def _complete_due(self) -> None:
        done = [r for r in self.running if self.length[r] >= self.total[r]]
        if done:
            self._complete(done)

    def _complete(self, done: list[int]) -> None:
        for r in done:
            self.running.remove(r)
            self._release(r, preempted=False)
        self.out.served += len(done)
        self.finished += len(done)
        self.stuck = False

    def _jump(self) -> None:
        """Skip steps in which only growth happens (no admission possible, no arrival that could
        be admitted), up to and including the next completion, as far as growth fits the pool:
        free units first, then the cache's least recently used (what one :meth:`_decode` per
        step would evict, in the same order)."""
        out, pool = self.out, self.pool
        next_arrival = int(self.arrive[self.order[self.next_arrival]]) if self.next_arrival < self.n else None
        if not self.running:
            if not self.waiting and next_arrival is not None and next_arrival > self.step:
                gap = next_arrival - self.step
                zeros = np.zeros(gap, dtype=np.int64)
                out.add_steps(zeros, np.full(gap, len(pool.cached)), zeros, 0)
                self.step += gap
            return
        if self.waiting and not self.stuck:
            return
        idx = np.array(self.running)
        left = self.total[idx] - self.length[idx]
        horizon = first_done = int(left.min())
        if not self.waiting and next_arrival is not None:
            horizon = min(horizon, next_arrival - self.step)
        horizon = min(horizon, _MAX_JUMP)
        if horizon <= 0:
            return
        grown = self.length[idx, None] + np.arange(1, horizon + 1)[None, :]
        need = np.maximum(self.unit.units_for(grown) - self.held[idx, None], 0)
        added = need.sum(axis=0)  # cumulative new units after each step
        jump = int(np.searchsorted(added, pool.available(), side="right"))
        if not jump:
            return
        added, free0, cached0 = added[:jump], pool.free, len(pool.cached)
        unshared0 = int(self.held[idx].sum())
        out.add_steps(pool.referenced + added, cached0 - np.maximum(added - free0, 0), unshared0 + added, len(idx))
        pool.grow_private(int(added[-1]))
        self.held[idx] += need[:, jump - 1]
        self.private[idx] += need[:, jump - 1]
        self.length[idx] += jump
        self.step += jump
        if jump == first_done:
            self._complete([r for r, k in zip(self.running, left) if k == jump])

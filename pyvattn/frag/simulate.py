"""A continuous-batching serving loop over a memory model, with the metrics users compare.

Requests arrive in trace order (or at their trace timestamps), are admitted while a slot is free
and the memory model can hold their prompt, then grow by one token per step until they reach
``prompt + output`` tokens and leave. Decode growth is served before admissions; if it does not
fit, the newest running request is preempted (its memory freed, the request queued again at the
front, as vLLM's recompute preemption does). Runs of steps in which only growth happens (no
completion, no arrival, admission blocked, growth within the unspent budget) are computed in one
vectorised jump, which keeps a whole trace fast.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import numpy as np
from tqdm import tqdm

from .traces import Request


@dataclass
class RunResult:
    """Time series (one entry per step) and per-request outcomes of one run."""

    scheme: str
    allocated: np.ndarray  # bytes allocated (all slots, finished ones' kept units included)
    used: np.ndarray  # bytes holding live tokens
    running: np.ndarray  # requests in the batch
    completion_waste: np.ndarray  # per finished request: 1 - used / its own allocation
    completion_alloc: np.ndarray  # bytes the request held when it finished
    completion_used: np.ndarray
    completion_step: np.ndarray  # step at which each finished request completed
    served: int = 0
    preemptions: int = 0
    rejected: int = 0  # prompts that could never fit the budget
    reclaimed_bytes: int = 0
    extra: dict = field(default_factory=dict)

    @property
    def steps(self) -> int:
        return len(self.allocated)

    def summary(self) -> dict:
        waste = self.allocated - self.used
        alloc_total = float(self.completion_alloc.sum()) or 1.0
        pct = ((lambda q: float(np.percentile(self.completion_waste, q))) if len(self.completion_waste)
               else (lambda q: 0.0))
        return {
            "scheme": self.scheme,
            "steps": self.steps,
            "served": self.served,
            "preemptions": self.preemptions,
            "rejected": self.rejected,
            "waste_at_completion_mean": float(self.completion_waste.mean()) if len(self.completion_waste) else 0.0,
            "waste_at_completion_p50": pct(50),
            "waste_at_completion_p99": pct(99),
            "waste_at_completion_aggregate": 1.0 - float(self.completion_used.sum()) / alloc_total,
            "time_avg_waste_fraction": float(waste.sum() / max(1, self.allocated.sum())),
            "time_avg_waste_bytes": float(waste.mean()) if self.steps else 0.0,
            "peak_allocated_bytes": int(self.allocated.max()) if self.steps else 0,
            "max_concurrent": int(self.running.max()) if self.steps else 0,
            "mean_concurrent": float(self.running.mean()) if self.steps else 0.0,
            "requests_per_step": self.served / max(1, self.steps),
            "reclaimed_bytes": self.reclaimed_bytes,
        }


def serve(requests: list[Request], memory, bytes_per_token: int, max_batch: int, scheme: str = "",
          arrival_step_seconds: float | None = None, progress: bool = False,
          on_step=None) -> RunResult:
    """Run ``requests`` through ``memory`` (a :class:`~.schemes.UnitMemory` or a
    :class:`~.schemes.CacheMemory`). With ``arrival_step_seconds`` requests arrive at their trace
    timestamps (one step lasting that long); otherwise all are queued at the start. ``on_step``,
    if given, is called after every executed (not skipped) step with ``(step, memory)``."""
    n = len(requests)
    prompt = np.array([r.prompt_tokens for r in requests], dtype=np.int64)
    total = np.array([r.total_tokens for r in requests], dtype=np.int64)
    if arrival_step_seconds:
        arrive = np.array([int((r.arrival_s or 0.0) // arrival_step_seconds) for r in requests])
    else:
        arrive = np.zeros(n, dtype=np.int64)
    order = np.argsort(arrive, kind="stable")
    next_arrival = 0  # index into order
    waiting: deque[int] = deque()
    req = np.full(max_batch, -1, dtype=np.int64)  # request in each slot, -1 = none
    length = np.zeros(max_batch, dtype=np.int64)
    admitted_at = np.zeros(max_batch, dtype=np.int64)  # admission sequence: newest is preempted
    seq = 0
    alloc_s, used_s, run_s = [], [], []
    c_waste, c_alloc, c_used, c_step = [], [], [], []
    served = preemptions = rejected = 0
    stuck = False  # the head of the queue failed admission and nothing was freed since
    step = 0
    bar = tqdm(total=n, desc=scheme or "serve", unit="req", disable=not progress, leave=False)

    while served + rejected < n:
        while next_arrival < n and arrive[order[next_arrival]] <= step:
            waiting.append(int(order[next_arrival]))
            next_arrival += 1
        slots = (req >= 0).nonzero()[0]
        # 1. decode: every running request grows by one token, preempting the newest if needed
        while len(slots) and not memory.grow(slots, length[slots] + 1):
            victim = int(slots[np.argmax(admitted_at[slots])])
            memory.free(victim)
            waiting.appendleft(int(req[victim]))
            req[victim] = -1
            preemptions += 1
            stuck = False
            slots = (req >= 0).nonzero()[0]
        length[slots] += 1
        # 2. admit waiting requests in order while a slot and memory allow. Once the head of the
        # queue failed, it keeps failing until something is freed (free memory, reclaimable pages
        # included, only shrinks meanwhile, and a failed try changes nothing), so don't retry.
        blocked = not waiting or stuck
        while waiting and not stuck:
            r = waiting[0]
            slot = memory.alloc(int(prompt[r]))
            if slot is None:
                blocked = stuck = True
                break
            if not memory.grow(np.array([slot]), np.array([prompt[r]])):
                memory.free(slot)
                if not (req >= 0).any():  # nothing running and it still does not fit: never will
                    waiting.popleft()
                    rejected += 1
                    bar.update(1)
                    continue
                blocked = stuck = True
                break
            waiting.popleft()
            req[slot], length[slot], admitted_at[slot] = r, prompt[r], seq
            seq += 1
        slots = (req >= 0).nonzero()[0]
        alloc_now, n_run = memory.allocated_bytes(), len(slots)
        used_now = int(length[slots].sum()) * bytes_per_token
        alloc_s.append(alloc_now)
        used_s.append(used_now)
        run_s.append(n_run)
        if on_step is not None:
            on_step(step, memory)
        # 3. completions
        done = slots[length[slots] >= total[req[slots]]]
        if len(done):
            for s, a in zip(done.tolist(), memory.held_bytes(done).tolist()):
                u = int(length[s]) * bytes_per_token
                c_alloc.append(a)
                c_used.append(u)
                c_waste.append(1.0 - u / a if a else 0.0)
                c_step.append(step)
                memory.free(s)
                req[s] = -1
            served += len(done)
            stuck = False
            bar.update(len(done))
            slots = (req >= 0).nonzero()[0]
        step += 1
        # 4. skip steps in which nothing but growth can happen: no completion, no arrival, no
        # growth that needs a reclaim or preemption, and admission already blocked (free memory
        # only shrinks until something completes, so it stays blocked)
        if blocked and len(done) == 0 and len(slots):
            horizon = int((total[req[slots]] - length[slots]).min()) - 1
            if next_arrival < n:
                horizon = min(horizon, int(arrive[order[next_arrival]]) - step)
            allocated = memory.advance(slots, length[slots], horizon) if horizon > 0 else []
            jump = len(allocated)
            if jump > 0:
                k = np.arange(1, jump + 1, dtype=np.int64)
                alloc_s.extend(allocated.tolist())
                used_s.extend((used_now + k * n_run * bytes_per_token).tolist())
                run_s.extend([n_run] * jump)
                length[slots] += jump
                step += jump
        elif not len(slots) and waiting == deque() and next_arrival < n:
            gap = int(arrive[order[next_arrival]]) - step  # idle until the next arrival
            if gap > 0:
                alloc_s.extend([memory.allocated_bytes()] * gap)
                used_s.extend([0] * gap)
                run_s.extend([0] * gap)
                step += gap
    bar.close()
    result = RunResult(scheme, np.array(alloc_s, dtype=np.int64), np.array(used_s, dtype=np.int64),
                       np.array(run_s, dtype=np.int64),
                       np.array(c_waste), np.array(c_alloc, dtype=np.int64), np.array(c_used, dtype=np.int64),
                       np.array(c_step, dtype=np.int64),
                       served=served, preemptions=preemptions, rejected=rejected)
    if hasattr(memory, "reclaimed_units"):
        result.reclaimed_bytes = memory.reclaimed_units * memory.unit_bytes
    return result

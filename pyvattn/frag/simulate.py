"""A continuous-batching serving loop over a memory model, with the metrics users compare.

The policy is vLLM's (v1 scheduler, ``vllm/v1/core/sched/scheduler.py``, read at commit b4622cf;
block watermark from v0's ``vllm/core/block_manager.py``), step by step:

1. Requests arrive in trace order (or at their trace timestamps). A request longer than the
   context (``max_context``), or one that could not complete even alone in the budget with the
   watermark kept free, is *rejected* at arrival, with its reason: vLLM refuses such requests
   rather than queueing them forever (v0's ``AllocStatus.NEVER``).
2. Decode: every running request grows by one token. If that does not fit, the most recently
   admitted request is *preempted* (``self.running.pop()``): its memory is freed and it goes back
   to the front of the queue keeping its generated tokens, to be refilled from prompt + generated
   tokens when readmitted (recompute preemption; ``num_computed_tokens = 0``).
3. Admission, only in a step that preempted nothing (``if not preempted_reqs:``), so a preempted
   request is never readmitted in the step that evicted it: waiting requests in order, while a
   batch slot is free and the request's tokens fit leaving ``watermark`` of the budget free
   (v0's ``watermark_blocks``, default 1%), so that admitted requests have room to grow.
4. Requests that reached prompt + output tokens leave.

Progress is guaranteed: the oldest running request is never preempted (only requests that can
complete alone are queued), so one completes at least every ``max_context`` steps; a watchdog
raises :class:`SimulationStuck` if that is ever violated. Runs of steps in which only growth
happens (no completion, no arrival, admission blocked, growth within the unspent budget) are
computed in one vectorised jump. Per-step series are summed as they come (memory bounded by the
number of requests, not steps); :class:`StepSeries` keeps them in full only on request.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import numpy as np

from .traces import Trace

REJECT_CONTEXT = "longer than the context"
REJECT_BUDGET = "cannot complete within the budget"


class SimulationStuck(RuntimeError):
    """The serving loop stopped making progress (a livelock the policy should rule out)."""


@dataclass(frozen=True)
class ServePolicy:
    """Scheduling limits: batch slots, context length, admission watermark (fraction of the
    budget kept free at admission), and the step length for arrivals at trace timestamps (None:
    every request is queued at the start)."""

    max_batch: int
    max_context: int
    watermark: float = 0.01
    arrival_step_seconds: float | None = None

    def __post_init__(self):
        for name in ("max_batch", "max_context"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"--{name.replace('_', '-')}={value!r} must be a whole number >= 1")
        if not 0.0 <= self.watermark < 1.0:
            raise ValueError(f"--watermark={self.watermark!r} must lie in [0, 1)")
        if self.arrival_step_seconds is not None and not self.arrival_step_seconds > 0:
            raise ValueError(f"--step-ms must be > 0 (got {self.arrival_step_seconds * 1000!r})")


class StepSeries:
    """Per-step series (allocated bytes, retained bytes, used bytes, running requests), summed as
    they come. ``points`` downsampled means of allocated bytes and running requests are kept for
    plots (bucket width doubles as the run grows); ``keep=True`` also keeps every value."""

    def __init__(self, keep: bool = False, points: int = 1024):
        self.steps = 0
        self.sum_alloc = self.sum_retained = self.sum_used = self.sum_running = 0
        self.peak_alloc = self.max_running = 0
        self._keep = keep
        self._full: list[tuple[np.ndarray, ...]] = []
        self._points, self._width = points, 1
        self._buckets: list[tuple[float, float]] = []  # (mean allocated, mean running)
        self._pending_alloc: list[int] = []
        self._pending_running: list[int] = []

    def add(self, alloc: int, retained: int, used: int, running: int) -> None:
        """One step."""
        self.steps += 1
        self.sum_alloc += alloc
        self.sum_retained += retained
        self.sum_used += used
        self.sum_running += running
        self.peak_alloc = max(self.peak_alloc, alloc)
        self.max_running = max(self.max_running, running)
        if self._keep:
            self._full.append((np.array([alloc]), np.array([retained]), np.array([used]), np.array([running])))
        self._pending_alloc.append(alloc)
        self._pending_running.append(running)
        if len(self._pending_alloc) >= self._width:
            self._fold()

    def add_run(self, alloc: np.ndarray, retained: np.ndarray, used: np.ndarray, running: int) -> None:
        """Consecutive steps with the same number of running requests."""
        k = len(alloc)
        if not k:
            return
        self.steps += k
        self.sum_alloc += int(alloc.sum())
        self.sum_retained += int(retained.sum())
        self.sum_used += int(used.sum())
        self.sum_running += running * k
        self.peak_alloc = max(self.peak_alloc, int(alloc.max()))
        self.max_running = max(self.max_running, running)
        if self._keep:
            self._full.append((alloc, np.asarray(retained), used, np.full(k, running)))
        if k > 4 * self._width:  # fold in bulk: finish the open bucket, then whole buckets at once
            head = self._width - len(self._pending_alloc)
            self._pending_alloc += alloc[:head].tolist()
            self._pending_running += [running] * head
            self._fold()
            body = (k - head) // self._width * self._width
            means = alloc[head:head + body].reshape(-1, self._width).mean(axis=1)
            self._buckets += [(float(a), float(running)) for a in means]
            self._shrink()
            self._pending_alloc += alloc[head + body:].tolist()
            self._pending_running += [running] * (k - head - body)
        else:
            self._pending_alloc += alloc.tolist()
            self._pending_running += [running] * k
            while len(self._pending_alloc) >= self._width:
                self._fold()

    def _fold(self) -> None:
        w = self._width
        a, r = self._pending_alloc[:w], self._pending_running[:w]
        del self._pending_alloc[:w], self._pending_running[:w]
        self._buckets.append((sum(a) / w, sum(r) / w))
        self._shrink()

    def _shrink(self) -> None:
        while len(self._buckets) >= 2 * self._points:
            b = self._buckets
            self._buckets = [((b[i][0] + b[i + 1][0]) / 2, (b[i][1] + b[i + 1][1]) / 2)
                             for i in range(0, len(b) - 1, 2)]
            self._width *= 2

    def downsampled(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(first step of each bucket, mean allocated bytes, mean running requests)."""
        b = self._buckets + ([(sum(self._pending_alloc) / len(self._pending_alloc),
                               sum(self._pending_running) / len(self._pending_running))]
                             if self._pending_alloc else [])
        arr = np.array(b, dtype=np.float64).reshape(-1, 2)
        return np.arange(len(arr)) * self._width, arr[:, 0], arr[:, 1]

    def full(self) -> dict[str, np.ndarray]:
        """Every step's values (only with ``keep=True``)."""
        if not self._keep:
            raise ValueError("StepSeries(keep=False) keeps sums only")
        cols = list(zip(*self._full)) or [[], [], [], []]
        return {name: np.concatenate([np.asarray(c, dtype=np.int64) for c in col]) if col else np.zeros(0, np.int64)
                for name, col in zip(("allocated", "retained", "used", "running"), cols)}


@dataclass
class RunResult:
    """Outcomes of one run: the step series, and per request (in trace order) when it completed,
    what it held then, and how often it was preempted."""

    scheme: str
    series: StepSeries
    completion_step: np.ndarray  # -1: not served
    completion_alloc: np.ndarray  # bytes the request held when it finished
    completion_needed: np.ndarray  # bytes its length needs in this scheme's units
    completion_used: np.ndarray  # bytes its tokens fill
    preempted: np.ndarray  # times each request was preempted
    rejected: dict[str, int] = field(default_factory=dict)  # reason -> requests
    preemptions: int = 0
    recomputed_tokens: int = 0  # tokens refilled after preemptions
    reclaimed_bytes: int = 0
    extra: dict = field(default_factory=dict)

    @property
    def steps(self) -> int:
        return self.series.steps

    @property
    def served(self) -> int:
        return int((self.completion_step >= 0).sum())

    @property
    def rejected_total(self) -> int:
        return sum(self.rejected.values())

    def summary(self) -> dict:
        """The numbers a table row shows, and more (JSON). Waste fractions are of allocated memory;
        ``waste = fragmentation + retained``: fragmentation is what running requests hold beyond
        their tokens inside the units their length needs; retained is what no running request
        needs (finished requests' pages under deferred reclaim, a reused slot's pages beyond its
        length), reclaimable at once. Per-request numbers are at completion, over served requests."""
        s, done = self.series, self.completion_step >= 0
        alloc, need, used = (self.completion_alloc[done], self.completion_needed[done], self.completion_used[done])
        held = np.maximum(alloc, 1)
        waste, frag, retained = (alloc - used) / held, (need - used) / held, (alloc - need) / held

        def stats(values: np.ndarray) -> dict:
            if not len(values):
                return {"mean": None, "p50": None, "p99": None}
            return {"mean": float(values.mean()), "p50": float(np.percentile(values, 50)),
                    "p99": float(np.percentile(values, 99))}

        frac = (lambda part: part / s.sum_alloc) if s.sum_alloc else (lambda part: 0.0)
        total_tokens = int(self.completion_used[done].sum())  # in bytes; converted below
        return {
            "scheme": self.scheme,
            "steps": s.steps,
            "served": self.served,
            "rejected": self.rejected_total,
            "rejected_by_reason": dict(self.rejected),
            "preemptions": self.preemptions,
            "requests_preempted": int((self.preempted > 0).sum()),
            "max_preemptions_per_request": int(self.preempted.max()) if len(self.preempted) else 0,
            "recomputed_tokens": self.recomputed_tokens,
            "waste_at_completion": stats(waste),
            "fragmentation_at_completion": stats(frag),
            "retained_at_completion": stats(retained),
            "waste_at_completion_aggregate": (1.0 - float(used.sum()) / float(alloc.sum())) if len(alloc) else None,
            "time_avg_waste_fraction": frac(s.sum_alloc - s.sum_used),
            "time_avg_fragmentation_fraction": frac(s.sum_alloc - s.sum_retained - s.sum_used),
            "time_avg_retained_fraction": frac(s.sum_retained),
            "time_avg_fragmentation_bytes": (s.sum_alloc - s.sum_retained - s.sum_used) / max(1, s.steps),
            "time_avg_retained_bytes": s.sum_retained / max(1, s.steps),
            "peak_allocated_bytes": s.peak_alloc,
            "max_concurrent": s.max_running,
            "mean_concurrent": s.sum_running / max(1, s.steps),
            "requests_per_step": self.served / max(1, s.steps),
            "reclaimed_bytes": self.reclaimed_bytes,
            "served_used_bytes": total_tokens,
        }


def arrival_steps(trace: Trace, step_seconds: float | None) -> np.ndarray:
    """The step at which each request arrives: its timestamp over ``step_seconds``, or 0 for all."""
    if step_seconds is None:
        return np.zeros(len(trace), dtype=np.int64)
    if trace.arrival_s is None:
        raise ValueError(f"trace {trace.name!r} has no arrival times: --arrivals timestamps needs them")
    return (trace.arrival_s // step_seconds).astype(np.int64)


def serve(trace: Trace, memory, bytes_per_token: int, policy: ServePolicy, scheme: str = "",
          progress=None, on_step=None, keep_series: bool = False) -> RunResult:
    """Run ``trace`` through ``memory`` (a :class:`~.schemes.UnitMemory` or a
    :class:`~.schemes.CacheMemory` with ``policy.max_batch`` slots) under ``policy``.
    ``progress(k)``, if given, is called as requests finish (served or rejected), in batches.
    ``on_step(step, memory)`` is called after every executed (not jumped) step."""
    n = len(trace)
    prompt, total = trace.prompt, trace.total
    arrive = arrival_steps(trace, policy.arrival_step_seconds)
    order = np.argsort(arrive, kind="stable")
    budget = memory.budget_units
    watermark = 0 if budget is None else int(policy.watermark * budget)
    beyond = total > policy.max_context
    never = ~beyond & (memory.need_units(np.minimum(total, policy.max_context)) + watermark > budget
                       if budget is not None else False)
    resume = prompt.copy()  # tokens a request is (re)filled with at admission
    B = policy.max_batch
    req = np.full(B, -1, dtype=np.int64)  # request in each slot, -1 = none
    length = np.zeros(B, dtype=np.int64)
    admitted_at = np.zeros(B, dtype=np.int64)  # admission sequence: the newest is preempted
    out = RunResult(scheme, StepSeries(keep_series), np.full(n, -1, dtype=np.int64),
                    np.zeros(n, dtype=np.int64), np.zeros(n, dtype=np.int64), np.zeros(n, dtype=np.int64),
                    np.zeros(n, dtype=np.int32), {REJECT_CONTEXT: 0, REJECT_BUDGET: 0})
    waiting: deque[int] = deque()
    next_arrival = seq = step = finished = live_tokens = reported = 0
    stuck = False  # the head of the queue failed admission and nothing was freed since
    last_progress = 0  # last step a request completed or the server was idle
    slots = np.zeros(0, dtype=np.int64)  # running slots, ascending
    report_every = max(1, n // 1000)

    def complete(done: np.ndarray, at_step: int) -> None:
        """Requests in ``done`` (slots) reached their length at ``at_step``: record and free them."""
        nonlocal finished, live_tokens
        held = memory.held_bytes(done)
        for s, a in zip(done.tolist(), held.tolist()):
            r, tokens = int(req[s]), int(length[s])
            out.completion_step[r] = at_step
            out.completion_alloc[r] = a
            out.completion_used[r] = tokens * bytes_per_token
            out.completion_needed[r] = int(memory.need_bytes(tokens))
            live_tokens -= tokens
            memory.free(s)
            req[s] = -1
        finished += len(done)

    while finished < n:
        while next_arrival < n and arrive[order[next_arrival]] <= step:
            r = int(order[next_arrival])
            next_arrival += 1
            if beyond[r] or never[r]:
                out.rejected[REJECT_CONTEXT if beyond[r] else REJECT_BUDGET] += 1
                finished += 1
            else:
                waiting.append(r)
        # 1. decode: every running request grows by one token; preempt the newest until it fits
        preempted_now = False
        if len(slots):
            grown = length[slots] + 1
            while not memory.grow(slots, grown):
                i = int(np.argmax(admitted_at[slots]))
                victim = int(slots[i])
                if len(slots) == 1:
                    raise SimulationStuck(
                        f"{scheme}: step {step}: the only running request (request {req[victim]}, "
                        f"{length[victim]} of {total[req[victim]]} tokens) does not fit the memory alone")
                r = int(req[victim])
                memory.free(victim)
                waiting.appendleft(r)
                resume[r] = length[victim]
                live_tokens -= int(length[victim])
                out.recomputed_tokens += int(length[victim])
                out.preempted[r] += 1
                out.preemptions += 1
                req[victim] = -1
                slots, grown = np.delete(slots, i), np.delete(grown, i)
                preempted_now = True
            length[slots] = grown
            live_tokens += len(slots)
        # 2. admission (not in a step that preempted): in order, while a slot is free and the
        # request fits with the watermark kept free. Once the head failed it keeps failing until
        # something is freed (what is available only shrinks meanwhile), so it is not retried.
        if preempted_now:
            stuck = False  # memory was freed: try again next step
        elif waiting and not stuck:
            admitted = False
            while waiting and len(slots) + admitted < B:
                r = waiting[0]
                tokens = int(resume[r])
                if memory.available_units() - int(memory.need_units(tokens)) < watermark:
                    stuck = True
                    break
                slot = memory.admit(tokens)
                if slot is None:
                    raise SimulationStuck(f"{scheme}: step {step}: request {r} was available memory "
                                          f"({tokens} tokens) but the memory model refused it")
                waiting.popleft()
                req[slot], length[slot], admitted_at[slot] = r, tokens, seq
                seq += 1
                live_tokens += tokens
                admitted += 1
            if admitted:
                slots = (req >= 0).nonzero()[0]
            if waiting and len(slots) >= B:
                stuck = True  # no slot until something completes
        n_run = len(slots)
        alloc_now = memory.allocated_bytes()
        retained_now = memory.retained_bytes()
        used_now = live_tokens * bytes_per_token
        out.series.add(alloc_now, retained_now, used_now, n_run)
        if on_step is not None:
            on_step(step, memory)
        # 3. completions
        done = slots[length[slots] >= total[req[slots]]] if n_run else slots
        if len(done):
            complete(done, step)
            stuck = False
            last_progress = step
            slots = (req >= 0).nonzero()[0]
        elif not n_run and not waiting:
            last_progress = step
        elif step - last_progress > policy.max_context + 1:
            raise SimulationStuck(f"{scheme}: no request completed in the {step - last_progress} steps "
                                  f"up to step {step} ({n_run} running, {len(waiting)} waiting)")
        if progress is not None and finished - reported >= report_every:
            progress(finished - reported)
            reported = finished
        step += 1
        # 4. jump over steps in which nothing but growth can happen (no arrival that could be
        # admitted, admission blocked, growth within the unspent budget or, with deferred
        # reclaim, reclaims from finished slots), up to and including the next completion step
        if not len(slots):
            if not waiting and next_arrival < n:  # idle until the next arrival
                gap = int(arrive[order[next_arrival]]) - step
                if gap > 0:
                    idle = np.full(gap, memory.allocated_bytes(), dtype=np.int64)
                    out.series.add_run(idle, np.full(gap, memory.retained_bytes(), dtype=np.int64),
                                       np.zeros(gap, dtype=np.int64), 0)
                    step += gap
                    last_progress = step
            continue
        if waiting and not stuck:
            continue
        lens = length[slots]
        left = total[req[slots]] - lens
        horizon = int(left.min())
        if not waiting and next_arrival < n:
            horizon = min(horizon, int(arrive[order[next_arrival]]) - step)
        if horizon <= 0:
            continue
        allocated, retained = memory.advance(slots, lens, horizon)
        jump = len(allocated)
        if jump:
            n_run = len(slots)
            used = (live_tokens + np.arange(1, jump + 1, dtype=np.int64) * n_run) * bytes_per_token
            out.series.add_run(allocated, retained, used, n_run)
            length[slots] += jump
            live_tokens += jump * n_run
            step += jump
            if jump == int(left.min()):  # the last step jumped over is a completion step
                complete(slots[left == jump], step - 1)
                stuck = False
                last_progress = step - 1
                slots = (req >= 0).nonzero()[0]
    if progress is not None and finished > reported:
        progress(finished - reported)
    if hasattr(memory, "reclaimed_units"):
        out.reclaimed_bytes = memory.reclaimed_units * memory.unit_bytes
    return out

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
        self.points = points
        self._keep = keep
        self._full: list[tuple[np.ndarray, ...]] = []
        self._width = 1
        self._buckets: list[tuple[float, float]] = []  # (mean allocated, mean running)
        self._pending = [0, 0, 0]  # the open bucket: allocated bytes and running requests summed, steps

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
        self._bucket(alloc, running, 1)

    def add_run(self, alloc: np.ndarray, retained: np.ndarray | None, used_first: int, used_step: int,
                running: int) -> None:
        """Consecutive steps with the same number of running requests; used bytes grow by
        ``used_step`` a step from ``used_first``; ``retained`` None: nothing retained."""
        k = len(alloc)
        if not k:
            return
        self.steps += k
        self.sum_alloc += int(alloc.sum())
        if retained is not None:
            self.sum_retained += int(retained.sum())
        self.sum_used += used_first * k + used_step * (k * (k - 1) // 2)
        self.sum_running += running * k
        self.peak_alloc = max(self.peak_alloc, int(alloc.max()))
        self.max_running = max(self.max_running, running)
        if self._keep:
            self._full.append((alloc, np.zeros(k, np.int64) if retained is None else np.asarray(retained),
                               used_first + used_step * np.arange(k, dtype=np.int64), np.full(k, running)))
        at = 0
        while at < k:  # bucket by bucket: about k / width iterations
            take = min(k - at, self._width - self._pending[2])
            self._bucket(int(alloc[at:at + take].sum()), running * take, take)
            at += take

    def _bucket(self, alloc_sum: int, running_sum: int, steps: int) -> None:
        """Add ``steps`` steps (at most what the open bucket lacks) to the open bucket."""
        pending = self._pending
        pending[0] += alloc_sum
        pending[1] += running_sum
        pending[2] += steps
        if pending[2] >= self._width:
            w = self._width
            self._buckets.append((pending[0] / w, pending[1] / w))
            self._pending = [0, 0, 0]
            if len(self._buckets) >= 2 * self.points:
                b = self._buckets
                self._buckets = [((b[i][0] + b[i + 1][0]) / 2, (b[i][1] + b[i + 1][1]) / 2)
                                 for i in range(0, len(b), 2)]
                self._width *= 2

    def load(self, *, steps: int, sum_alloc: int, sum_retained: int, sum_used: int, sum_running: int,
             peak_alloc: int, max_running: int, width: int, buckets: np.ndarray, pending: tuple[int, int, int]) -> None:
        """Take the sums and buckets of a run summed elsewhere (the compiled loop)."""
        self.steps, self.sum_alloc, self.sum_retained, self.sum_used = steps, sum_alloc, sum_retained, sum_used
        self.sum_running, self.peak_alloc, self.max_running = sum_running, peak_alloc, max_running
        self._width, self._buckets, self._pending = width, [tuple(b) for b in buckets.tolist()], list(pending)

    def downsampled(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(first step of each bucket, mean allocated bytes, mean running requests)."""
        alloc, running, steps = self._pending
        b = self._buckets + ([(alloc / steps, running / steps)] if steps else [])
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

    _summary: dict | None = None  # set by compact(), which drops the per-request arrays
    _curve: tuple | None = None  # ... keeping the completion curve

    @property
    def steps(self) -> int:
        return self.series.steps

    @property
    def served(self) -> int:
        return self._summary["served"] if self._summary else int((self.completion_step >= 0).sum())

    def completions(self, points: int = 2000) -> tuple[np.ndarray, np.ndarray]:
        """(step, requests completed by then), at most ``points`` points: the completion curve."""
        if self._summary:
            return self._curve
        done = np.sort(self.completion_step[self.completion_step >= 0])
        pick = np.unique(np.linspace(0, len(done) - 1, min(points, len(done))).astype(np.int64))
        return np.append(done[pick], self.steps), np.append(pick + 1, len(done))

    def compact(self) -> "RunResult":
        """This result without its per-request arrays (memory: a million requests' arrays over
        a dozen schemes are hundreds of MiB): the summary and the completion curve stay."""
        self._curve = self.completions()
        self._summary = self.summary()
        self.completion_step = self.completion_alloc = self.completion_needed = None
        self.completion_used = self.preempted = None
        return self

    @property
    def rejected_total(self) -> int:
        return sum(self.rejected.values())

    def summary(self) -> dict:
        """The numbers a table row shows, and more (JSON). Waste fractions are of allocated memory;
        ``waste = fragmentation + retained``: fragmentation is what running requests hold beyond
        their tokens inside the units their length needs; retained is what no running request
        needs (finished requests' pages under deferred reclaim, a reused slot's pages beyond its
        length), reclaimable at once. Per-request numbers are at completion, over served requests."""
        if self._summary:  # a copy may carry another scheme's name (identical runs are simulated once)
            return {**self._summary, "scheme": self.scheme}
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
    """Run ``trace`` through ``memory`` (a :class:`~.memory.UnitMemory` or a
    :class:`~.memory.CacheMemory` with ``policy.max_batch`` slots) under ``policy``.
    ``progress(k)``, if given, is called as requests finish (served or rejected), in batches.
    ``on_step(step, memory)`` is called after every executed (not jumped) step."""
    return _Server(trace, memory, bytes_per_token, policy, scheme, progress, on_step, keep_series).run()


class ServingLoop:
    """The step loop both simulators share (this module's and ``prefix_sim``'s): arrivals, decode,
    admission, the step's record, completions, progress, then the jump over growth-only steps.
    Subclasses supply the other phases and ``n``, ``finished``, ``step``, ``progress``, ``reported``,
    ``report_every``; arrivals (``arrive``, ``order``, ``beyond``, ``never``, ``waiting``,
    ``out.rejected``) are handled here alike."""

    def _serve(self) -> None:
        while self.finished < self.n:
            self._arrive()
            preempted = self._decode()
            self._admit(preempted)
            self._record()
            self._complete_due()
            if self.progress is not None and self.finished - self.reported >= self.report_every:
                self.progress(self.finished - self.reported)
                self.reported = self.finished
            self.step += 1
            self._jump()
        if self.progress is not None and self.finished > self.reported:
            self.progress(self.finished - self.reported)

    def _arrive(self) -> None:
        """Queue the requests that arrived by now; reject those that could never complete."""
        arrive, order, n = self.arrive, self.order, self.n
        while self.next_arrival < n and arrive[order[self.next_arrival]] <= self.step:
            r = int(order[self.next_arrival])
            self.next_arrival += 1
            if self.beyond[r] or self.never[r]:
                self.out.rejected[REJECT_CONTEXT if self.beyond[r] else REJECT_BUDGET] += 1
                self.finished += 1
            else:
                self.waiting.append(r)


class _Server(ServingLoop):
    """One serving run: the batch slots, the queue and the outcomes; one method per phase of a
    step (see the module docstring), and the jump over steps in which only growth happens."""

    def __init__(self, trace: Trace, memory, bytes_per_token: int, policy: ServePolicy, scheme: str,
                 progress, on_step, keep_series: bool):
        n = self.n = len(trace)
        self.memory, self.policy, self.scheme = memory, policy, scheme
        self.bytes_per_token, self.progress, self.on_step = bytes_per_token, progress, on_step
        self.total = trace.total
        self.arrive = arrival_steps(trace, policy.arrival_step_seconds)
        self.order = np.argsort(self.arrive, kind="stable")
        budget = memory.budget_units
        self.watermark = 0 if budget is None else int(policy.watermark * budget)
        self.beyond = self.total > policy.max_context
        self.never = ~self.beyond & (memory.need_units(np.minimum(self.total, policy.max_context))
                                     + self.watermark > budget if budget is not None else False)
        self.resume = trace.prompt.copy()  # tokens a request is (re)filled with at admission
        self.req = np.full(policy.max_batch, -1, dtype=np.int64)  # request in each slot, -1 = none
        self.length = np.zeros(policy.max_batch, dtype=np.int64)
        self.target = np.zeros(policy.max_batch, dtype=np.int64)  # the running request's total tokens
        self.admitted_at = np.zeros(policy.max_batch, dtype=np.int64)  # the newest is preempted
        self.slots = np.zeros(0, dtype=np.int64)  # running slots, ascending
        self.out = RunResult(scheme, StepSeries(keep_series), np.full(n, -1, dtype=np.int64),
                             np.zeros(n, dtype=np.int64), np.zeros(n, dtype=np.int64),
                             np.zeros(n, dtype=np.int64), np.zeros(n, dtype=np.int32),
                             {REJECT_CONTEXT: 0, REJECT_BUDGET: 0})
        self.waiting: deque[int] = deque()
        self.next_arrival = self.seq = self.step = self.finished = self.live_tokens = self.reported = 0
        self.stuck = False  # the head of the queue failed admission and nothing was freed since
        self.last_progress = 0  # last step a request completed or the server was idle
        self.report_every = max(1, n // 1000)

    def run(self) -> RunResult:
        from . import compiled
        from .memory import UnitMemory

        if type(self.memory) is UnitMemory and self.on_step is None and not self.out.series._keep \
                and compiled.enabled():
            return compiled.serve_compiled(self)
        self._serve()
        if hasattr(self.memory, "reclaimed_units"):
            self.out.reclaimed_bytes = self.memory.reclaimed_units * self.memory.unit_bytes
        return self.out

    def _decode(self) -> bool:
        """Every running request grows by one token, preempting the newest until that fits;
        whether anything was preempted."""
        slots, length, out = self.slots, self.length, self.out
        if not len(slots):
            return False
        preempted = False
        grown = length[slots] + 1
        while not self.memory.grow(slots, grown):
            i = int(np.argmax(self.admitted_at[slots]))
            victim = int(slots[i])
            r, tokens = int(self.req[victim]), int(length[victim])
            if len(slots) == 1:
                raise SimulationStuck(f"{self.scheme}: step {self.step}: the only running request (request "
                                      f"{r}, {tokens} of {self.total[r]} tokens) does not fit the memory alone")
            self.memory.free(victim)
            self.waiting.appendleft(r)
            self.resume[r] = tokens
            self.live_tokens -= tokens
            out.recomputed_tokens += tokens
            out.preempted[r] += 1
            out.preemptions += 1
            self.req[victim] = -1
            slots, grown = np.delete(slots, i), np.delete(grown, i)
            preempted = True
        length[slots] = grown
        self.live_tokens += len(slots)
        self.slots = slots
        return preempted

    def _admit(self, preempted: bool) -> None:
        """Admission, not in a step that preempted: in order, while a slot is free and the request
        fits with the watermark kept free. Once the head failed it keeps failing until something
        is freed (what is available only shrinks meanwhile), so it is not retried until then."""
        if preempted:
            self.stuck = False  # memory was freed: try again next step
            return
        waiting, memory, B = self.waiting, self.memory, self.policy.max_batch
        if not waiting or self.stuck:
            return
        admitted = 0
        while waiting and len(self.slots) + admitted < B:
            r = waiting[0]
            tokens = int(self.resume[r])
            if memory.available_units() - int(memory.need_units(tokens)) < self.watermark:
                self.stuck = True
                break
            slot = memory.admit(tokens)
            if slot is None:
                raise SimulationStuck(f"{self.scheme}: step {self.step}: request {r} fit the available memory "
                                      f"({tokens} tokens) but the memory model refused it")
            waiting.popleft()
            self.req[slot], self.length[slot], self.admitted_at[slot] = r, tokens, self.seq
            self.target[slot] = self.total[r]
            self.seq += 1
            self.live_tokens += tokens
            admitted += 1
        if admitted:
            self.slots = (self.req >= 0).nonzero()[0]
        if waiting and len(self.slots) >= B:
            self.stuck = True  # no slot until something completes

    def _record(self) -> None:
        memory = self.memory
        self.out.series.add(memory.allocated_bytes(), memory.retained_bytes(),
                            self.live_tokens * self.bytes_per_token, len(self.slots))
        if self.on_step is not None:
            self.on_step(self.step, memory)

    def _complete_due(self) -> None:
        """Requests that reached their length this step leave; the watchdog checks progress."""
        slots = self.slots
        done = slots[self.length[slots] >= self.target[slots]] if len(slots) else slots
        if len(done):
            self._complete(done, self.step)
        elif not len(slots) and not self.waiting:
            self.last_progress = self.step
        elif self.step - self.last_progress > self.policy.max_context + 1:
            raise SimulationStuck(f"{self.scheme}: no request completed in the {self.step - self.last_progress} "
                                  f"steps up to step {self.step} ({len(slots)} running, {len(self.waiting)} waiting)")

    def _complete(self, done: np.ndarray, at_step: int) -> None:
        """Requests in ``done`` (slots) reached their length at ``at_step``: record and free them."""
        out, memory, length, req = self.out, self.memory, self.length, self.req
        for s, held in zip(done.tolist(), memory.held_bytes(done).tolist()):  # usually one
            r, tokens = int(req[s]), int(length[s])
            out.completion_step[r] = at_step
            out.completion_alloc[r] = held
            out.completion_used[r] = tokens * self.bytes_per_token
            out.completion_needed[r] = int(memory.need_bytes(tokens))
            self.live_tokens -= tokens
            memory.free(s)
            req[s] = -1
        self.finished += len(done)
        self.stuck = False
        self.last_progress = at_step
        self.slots = (req >= 0).nonzero()[0]

    def _jump(self) -> None:
        """Skip the steps in which nothing but growth can happen (no arrival that could be
        admitted, admission blocked, growth within the unspent budget or, with deferred reclaim,
        with reclaims), up to and including the next completion step; or idle to an arrival."""
        slots, memory, out = self.slots, self.memory, self.out
        next_arrival = int(self.arrive[self.order[self.next_arrival]]) if self.next_arrival < self.n else None
        if not len(slots):
            if not self.waiting and next_arrival is not None and next_arrival > self.step:
                gap = next_arrival - self.step
                out.series.add_run(np.full(gap, memory.allocated_bytes(), dtype=np.int64),
                                   np.full(gap, memory.retained_bytes(), dtype=np.int64), 0, 0, 0)
                self.step += gap
                self.last_progress = self.step
            return
        if self.waiting and not self.stuck:
            return
        lens = self.length[slots]
        left = self.target[slots] - lens
        horizon = first_done = int(left.min())
        if not self.waiting and next_arrival is not None:
            horizon = min(horizon, next_arrival - self.step)
        if horizon <= 0:
            return
        allocated, retained = memory.advance(slots, lens, horizon)
        jump = len(allocated)
        if not jump:
            return
        n_run = len(slots)
        out.series.add_run(allocated, retained, (self.live_tokens + n_run) * self.bytes_per_token,
                           n_run * self.bytes_per_token, n_run)
        self.length[slots] = lens + jump
        self.live_tokens += jump * n_run
        self.step += jump
        if jump == first_done:  # the last step jumped over is a completion step
            self._complete(slots[left == jump], self.step - 1)

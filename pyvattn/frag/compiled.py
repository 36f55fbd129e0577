"""The serving loop of :mod:`.simulate` over a :class:`~.memory.UnitMemory`, compiled with numba.

Same policy, same results (every per-request array, every sum, every plot point; tests compare the
two on random traces under budget pressure), about 20 times faster on a million requests: the
Python loop pays a few dozen numpy calls per served request, this one under 10 ns per
running request per step. It runs step by step (no jumps: each step is a loop over the running slots),
which makes it the plainer statement of the policy as well.

State lives in numpy arrays (slots, queue, outcomes) and one int64 vector of scalars, so a run
can stop after a number of finished requests and resume: :func:`serve_compiled` returns to
Python that often to report progress. The Python loop stays for what this one does not do:
``on_step`` callbacks, kept step series, and the measured model (a real cache).
"""

from __future__ import annotations

import os

import numpy as np

try:
    import numba
except ImportError:  # the Python loop serves instead (slower); see enabled()
    numba = None

from .interrupts import interrupts_held
from .simulate import REJECT_BUDGET, REJECT_CONTEXT, RunResult, SimulationStuck, StepSeries

# Scalars of a run, one int64 vector (``st``): a run stops and resumes with them.
(STEP, FINISHED, NEXT_ARRIVAL, SEQ, LIVE_TOKENS, STUCK, LAST_PROGRESS, NSLOTS, QHEAD, QLEN,
 TOTAL_UNITS, NEEDED_UNITS, RECLAIMED_UNITS, PREEMPTIONS, RECOMPUTED, REJ_CONTEXT, REJ_BUDGET,
 STEPS, SUM_ALLOC_U, SUM_RETAINED_U, SUM_LIVE, SUM_RUNNING, PEAK_ALLOC_U, MAX_RUNNING,
 WIDTH, NBUCKETS, PEND_N, PEND_ALLOC_U, PEND_RUNNING, ERROR, ERR_A, ERR_B, ERR_C, NSTATE) = range(34)

# Settings (``p``), one int64 vector.
(N, BATCH, REGIONS, UNIT_BYTES, TOKEN_BYTES, BUDGET, DEFERRED, WATERMARK, MAX_CONTEXT, POINTS,
 NPARAMS) = range(11)

# Why a run stopped early (``st[ERROR]``); ``ERR_A..C`` say more.
OK, STUCK_ALONE, REFUSED, NO_PROGRESS = range(4)

_NO_BUDGET = 1 << 62


def enabled() -> bool:
    """Whether runs use this loop: numba is installed, and ``PYVATTN_FRAG_COMPILED`` is not 0."""
    return numba is not None and os.environ.get("PYVATTN_FRAG_COMPILED", "1") != "0"


def _njit(fn):
    if numba is None:
        return fn
    try:
        return numba.njit(cache=True, nogil=True)(fn)
    except RuntimeError:  # nowhere writable to cache the build (read-only install and home): compile per process
        return numba.njit(nogil=True)(fn)


@_njit
def _units_for(tokens, token_bytes, unit_bytes):
    return (tokens * token_bytes + unit_bytes - 1) // unit_bytes


@_njit
def _reclaim(short, keep, p, active, units, st):
    """UnitMemory._reclaim: take ``short`` units (all regions) from finished slots first, then
    from active slots' excess over ``keep``; the most first, the lowest slot among equals.
    False (nothing taken) if all excess together is short."""
    regions = p[REGIONS]
    per_region = -(-short // regions)
    B = len(active)
    first, best = 0, -1
    for s in range(B):  # usually the finished slot with the most covers it alone
        f = 0 if active[s] else units[s] - keep[s]
        if f > best:
            first, best = s, f
    if best >= per_region:
        units[first] -= per_region
        st[TOTAL_UNITS] -= per_region
        st[RECLAIMED_UNITS] += per_region * regions
        return True
    excess_sum = 0
    f_first, f_best, a_first, a_best = -1, 0, 0, -1
    for s in range(B):
        e = max(units[s] - keep[s], 0)
        excess_sum += e
        if not active[s] and e > f_best:
            f_first, f_best = s, e
        if e > a_best:
            a_first, a_best = s, e
    if short > excess_sum * regions:
        return False
    first = f_first if f_first >= 0 else a_first
    if max(units[first] - keep[first], 0) >= per_region:
        units[first] -= per_region
        st[TOTAL_UNITS] -= per_region
        st[RECLAIMED_UNITS] += per_region * regions
        return True
    # several donors: finished before active, the most first, the lowest slot among equals
    while per_region > 0:  # rare (a few times a run), so a scan per donor is enough
        s, e = -1, 0
        for t in range(B):
            f = max(units[t] - keep[t], 0)
            if f > 0 and (s < 0 or (active[s] and not active[t]) or (active[s] == active[t] and f > e)):
                s, e = t, f
        take = min(per_region, e)
        units[s] -= take
        st[TOTAL_UNITS] -= take
        st[RECLAIMED_UNITS] += take * regions
        per_region -= take
    return True


@_njit
def _free(slot, p, active, units, need, st):
    active[slot] = False
    st[NEEDED_UNITS] -= need[slot]
    need[slot] = 0
    if not p[DEFERRED]:
        st[TOTAL_UNITS] -= units[slot]
        units[slot] = 0


@_njit
def _alloc(length, p, active, units):
    """UnitMemory.alloc: the lowest free slot; with deferred reclaim the free slot with the fewest
    units that cover ``length``, else the one with the most (the lowest among equals). -1: none."""
    B = len(active)
    if not p[DEFERRED]:
        for s in range(B):
            if not active[s]:
                active[s] = True
                return s
        return -1
    best = -1
    if length:
        u = _units_for(length, p[TOKEN_BYTES], p[UNIT_BYTES])
        for s in range(B):
            if not active[s] and units[s] >= u and (best < 0 or units[s] < units[best]):
                best = s
    if best < 0:
        for s in range(B):
            if not active[s] and (best < 0 or units[s] > units[best]):
                best = s
    if best < 0:
        return -1
    active[best] = True
    return best


@_njit
def _admit_memory(length, p, active, units, need, keep, st):
    """UnitMemory.admit: a slot grown to ``length`` tokens (all or nothing), or -1."""
    slot = _alloc(length, p, active, units)
    if slot < 0:
        return -1
    nn = _units_for(length, p[TOKEN_BYTES], p[UNIT_BYTES])
    added = nn - units[slot]
    if added > 0:
        if p[BUDGET] >= 0:
            short = (added + st[TOTAL_UNITS]) * p[REGIONS] - p[BUDGET]
            if short > 0:
                keep[:] = need
                keep[slot] = nn
                if not _reclaim(short, keep, p, active, units, st):
                    _free(slot, p, active, units, need, st)
                    return -1
        units[slot] = nn
        st[TOTAL_UNITS] += added
    need[slot] = nn
    st[NEEDED_UNITS] += nn
    return slot


@_njit
def _grow(p, slots, ns, length, active, units, need, grown_need, keep, st):
    """UnitMemory.grow of every running slot by one token, all or nothing."""
    tb, ub = p[TOKEN_BYTES], p[UNIT_BYTES]
    added = 0
    for i in range(ns):
        s = slots[i]
        n = need[s]
        if (length[s] + 1) * tb > n * ub:  # a division only when the need grows
            n = max(n, _units_for(length[s] + 1, tb, ub))
        grown_need[s] = n
        if n > units[s]:
            added += n - units[s]
    if added > 0 and p[BUDGET] >= 0:
        short = (added + st[TOTAL_UNITS]) * p[REGIONS] - p[BUDGET]
        if short > 0:
            keep[:] = 0
            for i in range(ns):  # every active slot runs
                keep[slots[i]] = grown_need[slots[i]]
            if not _reclaim(short, keep, p, active, units, st):
                return False
    for i in range(ns):
        s = slots[i]
        n = grown_need[s]
        if n > units[s]:
            units[s] = n
        st[NEEDED_UNITS] += n - need[s]
        need[s] = n
    st[TOTAL_UNITS] += added
    return True


@_njit
def _rebuild_slots(req, slots, st):
    ns = 0
    for s in range(len(req)):
        if req[s] >= 0:
            slots[ns] = s
            ns += 1
    st[NSLOTS] = ns


@_njit
def _record(p, st, buckets, steps, alloc_u, retained_u, running):
    """StepSeries.add for ``steps`` steps alike (allocated and retained in units, all regions)."""
    st[STEPS] += steps
    st[SUM_ALLOC_U] += alloc_u * steps
    st[SUM_RETAINED_U] += retained_u * steps
    st[SUM_LIVE] += st[LIVE_TOKENS] * steps
    st[SUM_RUNNING] += running * steps
    st[PEAK_ALLOC_U] = max(st[PEAK_ALLOC_U], alloc_u)
    st[MAX_RUNNING] = max(st[MAX_RUNNING], running)
    while steps:
        take = min(steps, st[WIDTH] - st[PEND_N])
        steps -= take
        st[PEND_N] += take
        st[PEND_ALLOC_U] += alloc_u * take
        st[PEND_RUNNING] += running * take
        if st[PEND_N] >= st[WIDTH]:  # fold a bucket, as StepSeries._fold
            w, nb = st[WIDTH], st[NBUCKETS]
            buckets[nb, 0] = (st[PEND_ALLOC_U] * p[UNIT_BYTES]) / w
            buckets[nb, 1] = st[PEND_RUNNING] / w
            st[NBUCKETS] = nb + 1
            st[PEND_N] = st[PEND_ALLOC_U] = st[PEND_RUNNING] = 0
            if nb + 1 >= 2 * p[POINTS]:  # StepSeries._shrink
                for i in range(p[POINTS]):
                    buckets[i, 0] = (buckets[2 * i, 0] + buckets[2 * i + 1, 0]) / 2
                    buckets[i, 1] = (buckets[2 * i, 1] + buckets[2 * i + 1, 1]) / 2
                st[NBUCKETS] = p[POINTS]
                st[WIDTH] = 2 * w


@_njit
def _run(p, st, stop_at, total, arrive, order, rejects, resume, req, length, target, admitted_at, slots,
         queue, active, units, need, grown_need, keep, buckets, c_step, c_alloc, c_needed, c_used, preempted,
         bytes_per_token):
    """Steps until ``stop_at`` requests finished (or all have, or an error: ``st[ERROR]``)."""
    n, B, regions, ub, tb = p[N], p[BATCH], p[REGIONS], p[UNIT_BYTES], p[TOKEN_BYTES]
    while st[FINISHED] < n and st[FINISHED] < stop_at:
        step = st[STEP]
        # 1. arrivals: queue the requests that arrived by now; reject those that never could run
        while st[NEXT_ARRIVAL] < n and arrive[order[st[NEXT_ARRIVAL]]] <= step:
            r = order[st[NEXT_ARRIVAL]]
            st[NEXT_ARRIVAL] += 1
            if rejects[r] == 1:
                st[REJ_CONTEXT] += 1
                st[FINISHED] += 1
            elif rejects[r] == 2:
                st[REJ_BUDGET] += 1
                st[FINISHED] += 1
            else:
                queue[(st[QHEAD] + st[QLEN]) % n] = r
                st[QLEN] += 1
        # 2. decode: every running request grows by one token, the newest preempted until it fits
        was_preempted = False
        ns = st[NSLOTS]
        if ns:
            while not _grow(p, slots, ns, length, active, units, need, grown_need, keep, st):
                i = 0
                for j in range(1, ns):
                    if admitted_at[slots[j]] > admitted_at[slots[i]]:
                        i = j
                victim = slots[i]
                r, tokens = req[victim], length[victim]
                if ns == 1:
                    st[ERROR], st[ERR_A], st[ERR_B], st[ERR_C] = STUCK_ALONE, r, tokens, step
                    return
                _free(victim, p, active, units, need, st)
                st[QHEAD] = (st[QHEAD] - 1) % n  # to the front of the queue
                queue[st[QHEAD]] = r
                st[QLEN] += 1
                resume[r] = tokens
                st[LIVE_TOKENS] -= tokens
                st[RECOMPUTED] += tokens
                preempted[r] += 1
                st[PREEMPTIONS] += 1
                req[victim] = -1
                for j in range(i, ns - 1):
                    slots[j] = slots[j + 1]
                ns -= 1
                st[NSLOTS] = ns
                was_preempted = True
            for i in range(ns):
                length[slots[i]] += 1
            st[LIVE_TOKENS] += ns
        # 3. admission, not in a step that preempted: in order, with the watermark kept free
        if was_preempted:
            st[STUCK] = 0
        elif st[QLEN] and not st[STUCK]:
            admitted = 0
            while st[QLEN] and ns + admitted < B:
                r = queue[st[QHEAD]]
                tokens = resume[r]
                avail = _NO_BUDGET if p[BUDGET] < 0 else p[BUDGET] - st[NEEDED_UNITS] * regions
                if avail - _units_for(tokens, tb, ub) * regions < p[WATERMARK]:
                    st[STUCK] = 1
                    break
                slot = _admit_memory(tokens, p, active, units, need, keep, st)
                if slot < 0:
                    st[ERROR], st[ERR_A], st[ERR_B], st[ERR_C] = REFUSED, r, tokens, step
                    return
                st[QHEAD] = (st[QHEAD] + 1) % n
                st[QLEN] -= 1
                req[slot], length[slot], admitted_at[slot], target[slot] = r, tokens, st[SEQ], total[r]
                st[SEQ] += 1
                st[LIVE_TOKENS] += tokens
                admitted += 1
            if admitted:
                _rebuild_slots(req, slots, st)
                ns = st[NSLOTS]
            if st[QLEN] and ns >= B:
                st[STUCK] = 1  # no slot until something completes
        # 4. the step's record
        _record(p, st, buckets, 1, st[TOTAL_UNITS] * regions, (st[TOTAL_UNITS] - st[NEEDED_UNITS]) * regions, ns)
        # 5. completions
        done = 0
        for i in range(ns):
            s = slots[i]
            if length[s] >= target[s]:
                r, tokens = req[s], length[s]
                c_step[r] = step
                c_alloc[r] = units[s] * ub * regions
                c_used[r] = tokens * bytes_per_token
                c_needed[r] = _units_for(tokens, tb, ub) * regions * ub
                st[LIVE_TOKENS] -= tokens
                _free(s, p, active, units, need, st)
                req[s] = -1
                done += 1
        if done:
            st[FINISHED] += done
            st[STUCK] = 0
            st[LAST_PROGRESS] = step
            _rebuild_slots(req, slots, st)
        elif not ns and not st[QLEN]:
            st[LAST_PROGRESS] = step
        elif step - st[LAST_PROGRESS] > p[MAX_CONTEXT] + 1:
            st[ERROR], st[ERR_A], st[ERR_B], st[ERR_C] = NO_PROGRESS, step - st[LAST_PROGRESS], ns, st[QLEN]
            st[STEP] = step
            return
        step += 1
        st[STEP] = step
        # 6. idle until the next arrival
        if not st[NSLOTS] and not st[QLEN] and st[NEXT_ARRIVAL] < n:
            gap = arrive[order[st[NEXT_ARRIVAL]]] - step
            if gap > 0:
                _record(p, st, buckets, gap, st[TOTAL_UNITS] * regions,
                        (st[TOTAL_UNITS] - st[NEEDED_UNITS]) * regions, 0)
                st[STEP] = step + gap
                st[LAST_PROGRESS] = step + gap


def serve_compiled(server) -> RunResult:
    """Run a prepared :class:`~.simulate._Server` (over a fresh UnitMemory) in compiled code."""
    memory, policy, out = server.memory, server.policy, server.out
    n, B = server.n, policy.max_batch
    series: StepSeries = out.series
    p = np.zeros(NPARAMS, dtype=np.int64)
    p[N], p[BATCH], p[REGIONS] = n, B, memory.regions
    p[UNIT_BYTES], p[TOKEN_BYTES] = memory.unit_bytes, memory.token_bytes
    p[BUDGET] = -1 if memory.budget_units is None else memory.budget_units
    p[DEFERRED], p[WATERMARK], p[MAX_CONTEXT] = memory.deferred_reclaim, server.watermark, policy.max_context
    p[POINTS] = series.points
    st = np.zeros(NSTATE, dtype=np.int64)
    st[WIDTH] = 1
    rejects = np.where(server.beyond, 1, np.where(server.never, 2, 0)).astype(np.int8)
    queue = np.zeros(max(n, 1), dtype=np.int64)
    buckets = np.zeros((2 * series.points, 2), dtype=np.float64)
    slots = np.zeros(B, dtype=np.int64)
    grown_need, keep = np.zeros(B, dtype=np.int64), np.zeros(B, dtype=np.int64)
    arrays = (server.total.astype(np.int64), server.arrive.astype(np.int64), server.order.astype(np.int64), rejects,
              server.resume.astype(np.int64), server.req, server.length, server.target, server.admitted_at, slots,
              queue, memory.active, memory.units, memory.need, grown_need, keep, buckets, out.completion_step,
              out.completion_alloc, out.completion_needed, out.completion_used, out.preempted)
    reported = 0
    while st[FINISHED] < n:
        _run(p, st, min(n, st[FINISHED] + server.report_every), *arrays, server.bytes_per_token)
        if st[ERROR] != OK:
            raise _error(st, server)
        if server.progress is not None and st[FINISHED] > reported:
            server.progress(int(st[FINISHED]) - reported)
            reported = int(st[FINISHED])
    # the books back into the Python objects
    memory.total_units, memory.needed_units = int(st[TOTAL_UNITS]), int(st[NEEDED_UNITS])
    memory.reclaimed_units = int(st[RECLAIMED_UNITS])
    ub = memory.unit_bytes
    series.load(steps=int(st[STEPS]), sum_alloc=int(st[SUM_ALLOC_U]) * ub, sum_retained=int(st[SUM_RETAINED_U]) * ub,
                sum_used=int(st[SUM_LIVE]) * server.bytes_per_token, sum_running=int(st[SUM_RUNNING]),
                peak_alloc=int(st[PEAK_ALLOC_U]) * ub, max_running=int(st[MAX_RUNNING]), width=int(st[WIDTH]),
                buckets=buckets[:st[NBUCKETS]], pending=(int(st[PEND_ALLOC_U]) * ub, int(st[PEND_RUNNING]),
                                                         int(st[PEND_N])))
    out.rejected[REJECT_CONTEXT] += int(st[REJ_CONTEXT])
    out.rejected[REJECT_BUDGET] += int(st[REJ_BUDGET])
    out.preemptions, out.recomputed_tokens = int(st[PREEMPTIONS]), int(st[RECOMPUTED])
    out.reclaimed_bytes = memory.reclaimed_units * ub
    return out


def warm() -> None:
    """Compile the loop now (about 10 s the first time; later runs load the build numba cached
    next to this file): before worker processes fork, so that they inherit it. Ctrl-C meanwhile
    is raised when it is done: numba would drop it (see :func:`.interrupts.interrupts_held`)."""
    from .memory import UnitMemory
    from .simulate import ServePolicy, serve
    from .traces import Trace

    with interrupts_held():
        serve(Trace("warm-up", [1], [1]), UnitMemory(4096, 2048, 2, 2, 8, 1 << 20, True), 2048,
              ServePolicy(2, 8))


def _error(st, server) -> SimulationStuck:
    a, b, c = (int(v) for v in st[[ERR_A, ERR_B, ERR_C]])
    scheme = server.scheme
    if st[ERROR] == STUCK_ALONE:
        return SimulationStuck(f"{scheme}: step {c}: the only running request (request {a}, {b} of "
                               f"{server.total[a]} tokens) does not fit the memory alone")
    if st[ERROR] == REFUSED:
        return SimulationStuck(f"{scheme}: step {c}: request {a} fit the available memory ({b} tokens) but the "
                               f"memory model refused it")
    return SimulationStuck(f"{scheme}: no request completed in the {a} steps up to step {int(st[STEP])} ({b} running, "
                           f"{c} waiting)")

#!/usr/bin/env python3
"""Budget benchmark: what a charge costs a cache, in one process and across processes.

Per call, best of --repeat rounds of 2,000 calls: a try_charge + release pair on a MemoryBudget
(one threading.Lock) and on a SharedBudget (that lock plus flock on the ledger, a numpy sum over
its 128 slots), next to the bare locks; headroom() and report(); and a charge that fails on a
full ledger (it looks for dead processes in /proc first), with 1 and 127 other live accounts.
Then N processes charging one SharedBudget at once: pairs per second in all, and the check that
the limit was never passed. Prints tables and saves JSON: bench-results/bench_budget.json
(git-ignored), or with --save the committed benchmarks/results/bench_budget.json. Absolute times
are this machine's.

    python scripts/bench_budget.py [--repeat 5] [--seconds 2] [--save | --out PATH]
"""

from __future__ import annotations

import argparse
import fcntl
import json
import multiprocessing as mp
import os
import platform
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

from tqdm import tqdm

import resultpath
from pyvattn import MemoryBudget, SharedBudget

CALLS = 2000


def per_call_us(fn, repeat: int) -> float:
    """Best over ``repeat`` rounds of the mean time of one ``fn()`` in a round of CALLS calls."""
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        for _ in range(CALLS):
            fn()
        best = min(best, (time.perf_counter() - t0) / CALLS)
    return best * 1e6


def bench_calls(name: str, repeat: int) -> dict:
    lock = threading.Lock()

    def bare_lock():
        with lock:
            pass

    with tempfile.TemporaryFile() as f:
        def bare_flock():
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)

        rows = {"threading.Lock acquire+release": per_call_us(bare_lock, repeat),
                "flock LOCK_EX+LOCK_UN": per_call_us(bare_flock, repeat)}
    memory = MemoryBudget("1GiB").open_account("bench")
    shared_budget = SharedBudget(name, "1GiB")
    shared = shared_budget.open_account("bench")
    for kind, account in (("MemoryBudget", memory), ("SharedBudget", shared)):
        def pair(account=account):
            account.try_charge(2 << 20)
            account.release(2 << 20)

        rows[f"{kind} try_charge+release"] = per_call_us(pair, repeat)
        rows[f"{kind} headroom()"] = per_call_us(account.headroom, repeat)
        rows[f"{kind} report()"] = per_call_us(lambda a=account: a.report(used=1, retained=2), repeat)
    assert shared.try_charge(1 << 30)
    rows["SharedBudget failing try_charge, 1 live account"] = per_call_us(lambda: shared.try_charge(1), repeat)
    others = [shared_budget.open_account(f"other{i}") for i in range(126)]
    rows["SharedBudget failing try_charge, 127 live accounts"] = per_call_us(lambda: shared.try_charge(1), repeat)
    for account in others:
        account.close()
    shared_budget.close()
    return rows


def contender(name: str, seconds: float, start, results) -> None:
    budget = SharedBudget(name)
    account = budget.open_account(f"p{os.getpid()}")
    start.wait()
    pairs = refused = over = 0
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        for _ in range(100):
            if account.try_charge(2 << 20):
                over += budget.used() > budget.limit if pairs % 50 == 0 else 0
                account.release(2 << 20)
                pairs += 1
            else:
                refused += 1
    results.put((pairs, refused, over))
    budget.close()


def bench_contention(name: str, procs: int, seconds: float) -> dict:
    """``procs`` processes charge and release 2 MiB on one SharedBudget whose limit fits half of them."""
    name = f"{name}-{procs}"
    budget = SharedBudget(name, max(1, procs // 2) * (2 << 20))
    ctx = mp.get_context("fork")
    start, results = ctx.Event(), ctx.Queue()
    workers = [ctx.Process(target=contender, args=(name, seconds, start, results)) for _ in range(procs)]
    for w in workers:
        w.start()
    time.sleep(0.2)
    start.set()
    got = [results.get(timeout=seconds + 120) for _ in workers]
    for w in workers:
        w.join(60)
    budget.close()
    SharedBudget.remove(name)
    pairs = sum(g[0] for g in got)
    return {"processes": procs, "pairs_per_second": pairs / seconds, "refused": sum(g[1] for g in got),
            "limit_passed": sum(g[2] for g in got)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=5, help="rounds per call measurement (default: %(default)s)")
    ap.add_argument("--seconds", type=float, default=2.0, help="seconds of each contention run "
                    "(default: %(default)s)")
    resultpath.add_output_arguments(ap, "bench_budget")
    args = ap.parse_args(argv)
    if args.repeat < 1:
        ap.error("--repeat must be at least 1")
    if not args.seconds > 0:
        ap.error("--seconds must be more than 0")
    name = f"bench-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    try:
        calls = bench_calls(name, args.repeat)
        contention = [bench_contention(name, n, args.seconds) for n in tqdm((1, 2, 4), desc="contention")]
    finally:
        SharedBudget.remove(name)

    print("\nper call (best of rounds of 2,000 calls)")
    for what, us in calls.items():
        print(f"  {what:<52} {us:8.2f} us")
    print(f"\nprocesses charging and releasing 2 MiB on one SharedBudget for {args.seconds:g} s "
          f"(the limit fits half of them)")
    print(f"{'processes':>10} {'pairs/s':>12} {'refused':>10} {'limit passed':>13}")
    for r in contention:
        print(f"{r['processes']:>10} {r['pairs_per_second']:>12,.0f} {r['refused']:>10,} {r['limit_passed']:>13}")
    result = {"machine": {"platform": platform.platform(), "python": sys.version.split()[0],
                          "cpus": os.cpu_count(), "loadavg": os.getloadavg()},
              "args": {"repeat": args.repeat, "seconds": args.seconds},
              "per_call_us": calls, "contention": contention}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

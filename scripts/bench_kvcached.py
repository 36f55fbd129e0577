#!/usr/bin/env python3
"""pyvattn next to kvcached: one allocation pattern, latency per operation and memory held (JSON).

The pattern: a batch of requests is admitted with staggered prompt lengths, decodes ``--steps``
tokens each (every request one token per step), then every request finishes and its memory is
released. Llama-3-8B's KV geometry (32 layers, 8 KV heads x 128, fp16), 2 MiB physical pages on
both sides. No data is written: this compares the allocators, not attention.

* pyvattn: one ``KVCache`` on the cuda-vmm backend; ``alloc_slot`` + ``step`` per admitted
  request, one ``step`` per decode step for the whole batch, ``free_slot`` per finished request,
  then ``trim()`` hands every page back to the driver.
* kvcached (``kvcached.kv_cache_manager.KVCacheManager`` with its own KV tensors from
  ``kvcached.integration.vllm.interfaces.alloc_kv_cache``, as its tests drive it): 16-token
  blocks, ``alloc`` per admitted request, ``alloc(1)`` for each request that starts a new block
  in a decode step (as vLLM asks), ``free`` per finished request. Run twice, in child processes
  (its settings are read at import): with its background pre-mapping thread (its default) and
  without it (``KVCACHED_PAGE_PREALLOC_ENABLED=false``).

Memory held is each side's own count of mapped bytes, and the device's used memory (``cudaMemGetInfo``)
minus what it was before the side started, after admission, at the peak and after release.

Bringing kvcached to a GPU machine that reaches no registry. kvcached 0.1.6 (the newest on PyPI)
is published as a source distribution only (``kvcached-0.1.6.tar.gz``, 345 kB): its C++
extension (``kvcached._C``, links libcuda) is compiled at install time against the torch found
then, which must be a CUDA build, torch >= 2.10 (it targets torch's stable ABI). So it is built
*on* the GPU machine, whose image has torch 2.11+cu130, nvcc, ninja, setuptools and wheel:

    # here, with network (scripts/gpu_suite.sh --fetch-wheels does all of this):
    pip download --no-deps --no-binary=:all: --no-build-isolation kvcached==0.1.6 -d .cache/wheels
      (its setup.py imports torch to compute its metadata: gpu_suite.sh gives it a stand-in torch
       exposing only what setup.py reads, since a CPU torch makes it refuse)
    pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 \
        posix_ipc -d .cache/wheels          (kvcached's one dependency missing there; numpy and
                                             wrapt are in the image)
    # there (gpu_suite.sh does it, about a minute on 16 cores, while the test suite runs):
    pip install --no-deps --no-build-isolation --no-index --target $SITE .cache/wheels/kvcached-0.1.6.tar.gz

and ``.cache/wheels`` travels as a carried path. Never committed.

    python scripts/bench_kvcached.py [--batch 64] [--steps 512] [--prompt 1000]
    python scripts/bench_kvcached.py --device cpu --layers 2 --batch 4 --steps 40   # pyvattn side only
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

import benchlib
import resultpath

MODEL = dict(kv_heads=8, head_dim=128)
BLOCK = 16  # kvcached's (vLLM's) block, tokens


@dataclass
class Workload:
    """Prompt lengths (staggered, so requests cross page and block boundaries at different
    steps) and the number of decode steps."""

    layers: int
    batch: int
    prompt: int
    spread: int
    steps: int

    @property
    def prompts(self) -> list[int]:
        return [self.prompt + (b * 997) % max(1, self.spread) for b in range(self.batch)]

    @property
    def max_len(self) -> int:
        return max(self.prompts) + self.steps


@dataclass
class Record:
    """Milliseconds per operation, by kind, and memory held at the checkpoints."""

    ms: dict[str, list[float]] = field(default_factory=lambda: {"admit": [], "decode step": [], "release": []})
    memory: dict[str, dict] = field(default_factory=dict)
    notes: dict = field(default_factory=dict)

    def timed(self, kind: str, fn, *args):
        t0 = time.perf_counter()
        out = fn(*args)
        self.ms[kind].append((time.perf_counter() - t0) * 1e3)
        return out

    def as_dict(self) -> dict:
        return {"ms": {k: benchlib.summary(v) | {"total": float(np.sum(v))} for k, v in self.ms.items()},
                "memory": self.memory, **self.notes}


def device_used(device: torch.device) -> int:
    if device.type != "cuda":
        return 0
    free, total = torch.cuda.mem_get_info(device)
    return total - free


# --- pyvattn ------------------------------------------------------------------------------------
def run_pyvattn(w: Workload, device: torch.device, backend: str) -> dict:
    from pyvattn import KVCache

    rec = Record()
    base = device_used(device)
    cache = KVCache(w.layers, MODEL["kv_heads"], MODEL["head_dim"], w.batch, w.max_len, dtype=torch.float16,
                    device=device, backend=backend)

    def memory(point: str) -> None:
        s = cache.stats()
        rec.memory[point] = {"mapped_bytes": s["mapped_bytes"], "physical_bytes": s["physical_bytes"],
                             "device_used_delta": device_used(device) - base}

    try:
        lens = {}
        for n in w.prompts:
            def admit(n=n):
                slot = cache.alloc_slot()
                cache.step({slot: n})
                return slot
            lens[rec.timed("admit", admit)] = n
        memory("after admission")
        for _ in range(w.steps):
            lens = {s: n + 1 for s, n in lens.items()}
            rec.timed("decode step", cache.step, lens)
        memory("peak (end of decode)")
        for slot in list(lens):
            rec.timed("release", cache.free_slot, slot)
        rec.timed("release", cache.trim)
        memory("after release")
        s = cache.stats()
        rec.notes.update(backend=s["backend"], page_size=s["page_size"], map_calls=s["map_calls"],
                         release_ops="free_slot per request (pages stay mapped: deferred reclaim), then one trim()")
    finally:
        cache.close()
    return rec.as_dict()


# --- kvcached (in a child process: its settings are read at import) ----------------------------
def run_kvcached(w: Workload, device: torch.device) -> dict:
    import kvcached
    from kvcached.integration.vllm.interfaces import alloc_kv_cache, init_kvcached, shutdown_kvcached
    from kvcached.kv_cache_manager import KVCacheManager
    from kvcached.utils import PAGE_PREALLOC_ENABLED, PAGE_SIZE
    from kvcached.vmm_ops import kv_tensors_created

    rec = Record()
    torch.cuda.set_device(device)
    base = device_used(device)
    blocks_needed = sum(-(-(n + w.steps) // BLOCK) for n in w.prompts)
    num_blocks = 2 * blocks_needed
    cell = MODEL["kv_heads"] * MODEL["head_dim"] * 2  # bytes per token per layer, K or V
    init_kvcached(tp_rank=0, world_size=1, is_worker=True, async_sched=False, device=f"cuda:{device.index or 0}")
    mgr = None
    try:
        alloc_kv_cache(kvcache_shape=(2, num_blocks, BLOCK, MODEL["kv_heads"], MODEL["head_dim"]), block_size=BLOCK,
                       dtype=torch.float16, device=f"cuda:{device.index or 0}", num_layers=w.layers)
        deadline = time.monotonic() + 30
        while not kv_tensors_created():
            if time.monotonic() > deadline:
                raise TimeoutError("kvcached: KV tensors not created within 30 s")
            time.sleep(0.01)
        mgr = KVCacheManager(num_blocks=num_blocks, block_size=BLOCK, cell_size=cell, num_layers=w.layers, world_size=1)

        def memory(point: str) -> None:
            rec.memory[point] = {"mapped_bytes": int(mgr.get_mapped_memory_size("bytes")),
                                 "device_used_delta": device_used(device) - base}

        blocks: list[list[int]] = []
        lens = []
        for n in w.prompts:
            got = rec.timed("admit", mgr.alloc, -(-n // BLOCK))
            if got is None:
                raise MemoryError(f"kvcached: alloc({-(-n // BLOCK)}) returned None")
            blocks.append(list(got))
            lens.append(n)
        memory("after admission")
        for _ in range(w.steps):
            def step():
                for i, n in enumerate(lens):
                    if n % BLOCK == 0:  # the next token starts a new block
                        got = mgr.alloc(1)
                        if got is None:
                            raise MemoryError("kvcached: alloc(1) returned None")
                        blocks[i].extend(got)
                    lens[i] = n + 1
            rec.timed("decode step", step)
        memory("peak (end of decode)")
        for b in blocks:
            rec.timed("release", mgr.free, b)
        memory("after release")
        rec.notes.update(version=getattr(kvcached, "__version__", "unknown"), page_size=PAGE_SIZE,
                         prealloc_thread=PAGE_PREALLOC_ENABLED, block_tokens=BLOCK, num_blocks=num_blocks,
                         release_ops="free per request (empty pages are unmapped)")
    finally:
        if mgr is not None:
            mgr.shutdown()
        shutdown_kvcached()
    return rec.as_dict()


def kvcached_child(w: Workload, device: torch.device, prealloc: bool, timeout_s: float) -> dict:
    env = dict(os.environ, KVCACHED_PAGE_PREALLOC_ENABLED="true" if prealloc else "false",
               KVCACHED_CONTIGUOUS_LAYOUT=os.environ.get("KVCACHED_CONTIGUOUS_LAYOUT", "true"),
               KVCACHED_LOG_LEVEL="WARNING")
    cmd = [sys.executable, str(Path(__file__).resolve()), "--kvcached-child", "--device", str(device),
           "--layers", str(w.layers), "--batch", str(w.batch), "--prompt", str(w.prompt),
           "--spread", str(w.spread), "--steps", str(w.steps)]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout_s:.0f} s"}
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("{")]
    if done.returncode or not lines:
        return {"error": f"exit {done.returncode}: {(done.stderr or done.stdout).strip()[-600:]}"}
    return json.loads(lines[-1])


def kvcached_importable() -> str | None:
    """None if kvcached and its extension import here, else why not."""
    try:
        import kvcached.vmm_ops  # noqa: F401 - loads the compiled extension
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


# --- report -------------------------------------------------------------------------------------
def render(result: dict) -> str:
    sides = {k: v for k, v in result["sides"].items() if "ms" in v}
    lines = []
    if sides:
        head = ["operation (ms)"] + [f"{name} p50 / p99 / max" for name in sides]
        rows = []
        for kind in ("admit", "decode step", "release"):
            stats = [s["ms"][kind] for s in sides.values()]
            rows.append([kind] + [f"{m['p50']:.3f} / {m['p99']:.3f} / {m['max']:.3f}" if m["n"] else "-"
                                  for m in stats])
            rows.append([f"  {kind}, total"] + [f"{s['ms'][kind]['total']:.1f}" for s in sides.values()])
        points = list(next(iter(sides.values()))["memory"])
        for point in points:
            rows.append([f"mapped, {point} (MiB)"] + [f"{s['memory'].get(point, {}).get('mapped_bytes', 0) / 2**20:.0f}"
                                                         for s in sides.values()])
            rows.append([f"  device memory used, {point} (MiB, vs before)"] + [
                f"{s['memory'].get(point, {}).get('device_used_delta', 0) / 2**20:.0f}" for s in sides.values()])
        w = result["workload"]
        lines += [f"\n{w['batch']} requests, prompts {min(w['prompts'])}-{max(w['prompts'])} tokens, "
                  f"{w['steps']} decode steps, {w['layers']} layers", benchlib.table(head, rows)]
    for name, side in result["sides"].items():
        if "ms" not in side:
            lines.append(f"{name}: {side.get('error') or side.get('skipped')}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", type=benchlib.device_arg, default="cuda")
    ap.add_argument("--backend", default=None, help="pyvattn backend (default: cuda-vmm on a GPU, host on the CPU)")
    ap.add_argument("--layers", type=benchlib.positive_int, default=32)
    ap.add_argument("--batch", type=benchlib.positive_int, default=64)
    ap.add_argument("--prompt", type=benchlib.positive_int, default=1000, help="shortest prompt, tokens")
    ap.add_argument("--spread", type=benchlib.nonnegative_int, default=1000,
                    help="prompts lie in [prompt, prompt + spread)")
    ap.add_argument("--steps", type=benchlib.positive_int, default=512)
    ap.add_argument("--child-timeout", type=float, default=25.0, help="seconds for each kvcached run")
    resultpath.add_output_arguments(ap, "bench_kvcached")
    ap.add_argument("--kvcached-child", action="store_true", help=argparse.SUPPRESS)
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    device = args.device
    if device.type == "cuda" and not torch.cuda.is_available():
        print("bench_kvcached.py: torch sees no CUDA GPU (--device cpu runs the pyvattn side alone)", file=sys.stderr)
        return 2
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    w = Workload(args.layers, args.batch, args.prompt, args.spread, args.steps)
    if args.kvcached_child:
        print(json.dumps(run_kvcached(w, device)), flush=True)
        os._exit(0)  # kvcached's threads and shared memory are shut down; no interpreter teardown
    backend = args.backend or ("cuda-vmm" if device.type == "cuda" else "host")
    result = {"machine": benchlib.machine_facts(device), "args": {k: str(v) for k, v in vars(args).items()},
              "workload": {**vars(w), "prompts": w.prompts}, "sides": {}}
    result["sides"][f"pyvattn ({backend})"] = run_pyvattn(w, device, backend)
    why_not = "no GPU" if device.type != "cuda" else kvcached_importable()
    for prealloc in (True, False):
        name = f"kvcached ({'with' if prealloc else 'no'} pre-mapping thread)"
        result["sides"][name] = ({"skipped": f"skipped: {why_not}"} if why_not
                                 else kvcached_child(w, device, prealloc, args.child_timeout))
    print(render(result))
    benchlib.save_json(Path(args.out), result)
    # On a GPU, a kvcached that cannot be imported means no comparison: that is this run's failure.
    failed = [n for n, s in result["sides"].items() if "error" in s or (device.type == "cuda" and "skipped" in s)]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

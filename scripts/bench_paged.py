#!/usr/bin/env python3
"""Decode attention on pyvattn's contiguous cache against a paged kernel, same shapes (table + JSON).

vAttention's headline claim is decode up to ~2x faster than vLLM's paged kernel, on an A100.
This checks the idea on the GPU at hand with the kernels that can run there, on identical K/V
values and shapes (Llama-3-8B attention: 32 query heads, 8 KV heads, head_dim 128, fp16):

* ``contiguous``: pyvattn's ``attention.decode`` on a cuda-vmm ``KVCache`` (flash-attn when
  installed, else the FlashAttention-2 kernels inside torch, ``torch-flash``);
* ``paged flash-attn``: ``flash_attn_with_kvcache(block_table=...)`` over 256-token pages, when
  flash-attn is importable (the same kernel family as above, paged);
* ``contiguous flex`` and ``paged flex``: PyTorch's FlexAttention (ships with torch, compiled
  with Triton) on the contiguous cache and on 128-token pages through
  ``torch.nn.attention.experimental._paged_attention.PagedAttention``'s block-mask conversion
  (the same kernel both ways, so its ratio is the cost of paging alone).

Pages of the paged copies are shuffled, as a serving engine's block tables are. FlashInfer and
vLLM's kernels are not installed on the lent machines and cannot be fetched there (see
docs/benchmarks.md); which kernels ran is recorded. Each kernel is first checked on fresh random
ragged inputs against a float64 reference (``‖out − ref‖ / ‖ref‖``). Batches 1-256, contexts
1K-32K; results are saved after every shape, so a time-boxed run keeps what it finished.

    python scripts/bench_paged.py [--batches 1,16,64,256] [--contexts 1024,4096,16384,32768]
    python scripts/bench_paged.py --device cpu      # numerics only (eager FlexAttention, SDPA)
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import torch

import benchlib
import resultpath
from pyvattn import KVCache, attention

MODEL = dict(q_heads=32, kv_heads=8, head_dim=128)
FLEX_PAGE = 128  # FlexAttention's KV block: PagedAttention needs page size == block size
FLASH_PAGE = 256  # flash-attn's paged KV needs pages of a multiple of 256 tokens
TOLERANCE = {torch.float16: 5e-3, torch.bfloat16: 2e-2, torch.float32: 1e-5}


# --- kernels ------------------------------------------------------------------------------------
def _flex():
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    return flex_attention, create_block_mask


class Flex:
    """FlexAttention, compiled once on a GPU (eager on the CPU, where it is the reference math)."""

    def __init__(self, device: torch.device):
        flex_attention, self.create_block_mask = _flex()
        self.fn = flex_attention
        if device.type == "cuda":
            import torch._dynamo.config as dynamo

            # Past the recompile limit, torch.compile falls back to eager, and eager FlexAttention
            # materialises every score (tens of GB at batch 256 x 32K): fail instead, per shape.
            limits = (("recompile_limit", 64), ("cache_size_limit", 64), ("fail_on_recompile_limit_hit", True))
            for name, value in limits:
                if hasattr(dynamo, name):
                    setattr(dynamo, name, value)
            self.fn = torch.compile(flex_attention, dynamic=True)

    def __call__(self, q, k, v, block_mask):
        """``q [B, 1, Hq, D]``; ``k``/``v`` as FlexAttention takes them ``[Bkv, Hkv, N, D]``."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # eager flex on the CPU warns that it is not compiled
            out = self.fn(q.transpose(1, 2), k, v, block_mask=block_mask, enable_gqa=True)
        return out.transpose(1, 2)

    def length_mask(self, lens: torch.Tensor, kv_len: int, block: int):
        """Block mask of request ``b`` seeing keys ``[0, lens[b])``."""

        def visible(b, h, q_idx, kv_idx):
            return kv_idx < lens[b]

        return self.create_block_mask(visible, lens.numel(), None, 1, kv_len, device=lens.device,
                                      BLOCK_SIZE=block)


def contiguous_flex(flex: Flex, q, k_cache, v_cache, lens):
    """FlexAttention straight on the cache ``[max_batch, max_seq, Hkv, D]`` (a strided view, no copy).
    Always through a length mask, even where every request spans the cache: the kernel compiled
    for the numerics check then serves every timed shape (no second compile on the clock)."""
    B, S = q.shape[0], k_cache.shape[1]
    k, v = k_cache[:B].permute(0, 2, 1, 3), v_cache[:B].permute(0, 2, 1, 3)
    mask = flex.length_mask(lens, S, FLEX_PAGE)
    return lambda: flex(q, k, v, mask)


def shuffled_pages(lens: torch.Tensor, page: int, gen: torch.Generator) -> torch.Tensor:
    """A block table ``[B, max_pages]`` (int64, -1 where unused): every request's pages drawn from
    one shuffled pool, as an engine that has run for a while hands them out."""
    counts = (lens + page - 1) // page
    total, width = int(counts.sum()), int(counts.max())
    pool = torch.randperm(total, generator=gen).to(lens.device)
    table = torch.full((lens.numel(), width), -1, dtype=torch.int64, device=lens.device)
    cols = torch.arange(width, device=lens.device)
    used = cols[None, :] < counts[:, None]
    table[used] = pool
    return table


def paged_copy(cache: torch.Tensor, lens: torch.Tensor, table: torch.Tensor, page: int) -> torch.Tensor:
    """The first ``lens[b]`` tokens of every cache row, copied into pages ``[pages, page, Hkv, D]``
    at the places ``table`` gives."""
    pages = int((table >= 0).sum())
    out = torch.zeros((pages, page, *cache.shape[2:]), dtype=cache.dtype, device=cache.device)
    for b in range(lens.numel()):
        n = int(lens[b])  # never read past it: pyvattn's pages beyond may be unmapped
        full = -(-n // page)
        blocks = torch.zeros((full * page, *cache.shape[2:]), dtype=cache.dtype, device=cache.device)
        blocks[:n] = cache[b, :n]
        out[table[b, :full]] = blocks.view(full, page, *cache.shape[2:])
    return out


def paged_flex(flex: Flex, q, k_cache, v_cache, lens, gen):
    """FlexAttention over shuffled 128-token pages, the block mask converted by PyTorch's
    ``PagedAttention`` (its page table and reverse map filled in directly, vectorised)."""
    from torch.nn.attention.experimental._paged_attention import PagedAttention

    B = q.shape[0]
    table = shuffled_pages(lens.long(), FLEX_PAGE, gen)
    kp, vp = (paged_copy(c, lens, table, FLEX_PAGE) for c in (k_cache, v_cache))
    n_pages = kp.shape[0]
    pa = PagedAttention(n_pages, FLEX_PAGE, B, device=q.device)
    width = table.shape[1]
    pa.page_table[:, :width] = table
    used = table >= 0
    b_idx = torch.arange(B, device=q.device)[:, None].expand_as(table)
    logical = torch.arange(width, device=q.device)[None, :].expand_as(table)
    pa.physical_to_logical[b_idx[used], table[used]] = logical[used]
    pa.capacity[:] = used.sum(1) * FLEX_PAGE
    logical_mask = flex.length_mask(lens, width * FLEX_PAGE, FLEX_PAGE)
    mask = pa.convert_logical_block_mask(logical_mask, kv_len=lens)
    # pages [n, page, Hkv, D] read as one sequence [1, Hkv, n * page, D] (a strided view)
    k = kp.view(-1, *kp.shape[2:]).permute(1, 0, 2)[None]
    v = vp.view(-1, *vp.shape[2:]).permute(1, 0, 2)[None]
    return lambda: flex(q, k, v, mask)


def paged_flash_attn(q, k_cache, v_cache, lens, gen):
    """flash-attn's own paged path: ``flash_attn_with_kvcache(block_table=...)``, 256-token pages."""
    from flash_attn import flash_attn_with_kvcache

    table = shuffled_pages(lens.long(), FLASH_PAGE, gen)
    kp, vp = (paged_copy(c, lens, table, FLASH_PAGE) for c in (k_cache, v_cache))
    bt = table.clamp(min=0).to(torch.int32)
    lens32 = lens.to(torch.int32)
    return lambda: flash_attn_with_kvcache(q, kp, vp, cache_seqlens=lens32, block_table=bt, causal=True)


def contiguous_pyvattn(q, k_cache, v_cache, lens):
    """pyvattn's own decode path on its cache (whichever implementation ``auto`` picks)."""
    lens32 = lens.to(torch.int32)
    return lambda: attention.decode(q, k_cache, v_cache, lens32)


def kernels(device: torch.device, dtype: torch.dtype) -> dict:
    """name -> builder(q, k_cache, v_cache, lens, gen) of every kernel that can run here."""
    out = {f"contiguous ({attention.backend_name(device, dtype=dtype)})":
           lambda q, k, v, lens, gen: contiguous_pyvattn(q, k, v, lens)}
    if device.type == "cuda" and attention.flash_available() and dtype in attention.FLASH_DTYPES:
        out[f"paged flash-attn ({FLASH_PAGE}-token pages)"] = paged_flash_attn
    try:
        flex = Flex(device)
    except Exception as exc:  # no FlexAttention in this torch
        out["paged flex"] = exc
        return out
    out["contiguous flex"] = lambda q, k, v, lens, gen: contiguous_flex(flex, q, k, v, lens)
    out[f"paged flex ({FLEX_PAGE}-token pages)"] = lambda q, k, v, lens, gen: paged_flex(flex, q, k, v, lens, gen)
    return out


# --- one shape ----------------------------------------------------------------------------------
def filled_cache(batch: int, max_seq: int, lens: torch.Tensor, dtype, device, backend: str, gen) -> KVCache:
    """A one-layer pyvattn cache with random K/V in every request's first ``lens[b]`` tokens.

    Every row is mapped to ``max_seq``: eager FlexAttention (the CPU path) computes every key
    position before masking, which would touch the host backend's unmapped (PROT_NONE) pages."""
    cache = KVCache(1, MODEL["kv_heads"], MODEL["head_dim"], batch, max_seq, dtype=dtype, device=device,
                    backend=backend)
    slots = [cache.alloc_slot() for _ in range(batch)]
    assert slots == list(range(batch))
    cache.step({b: max_seq for b in slots})
    for b, n in enumerate(lens.tolist()):
        for t in (cache.k[0], cache.v[0]):
            t[b, :n].copy_(torch.randn((n, MODEL["kv_heads"], MODEL["head_dim"]), generator=gen,
                                       dtype=torch.float32, device=device).to(dtype))
    return cache


def reference(q, k_cache, v_cache, lens) -> torch.Tensor:
    """float64 decode on the CPU through pyvattn's SDPA path (which tests/test_attention.py checks
    against a written-out float64 reference)."""
    return attention.decode(q.double().cpu(), k_cache.double().cpu(), v_cache.double().cpu(),
                            lens.cpu().to(torch.int32), impl="sdpa")


def check_numerics(args, device, dtype, builders, gen) -> dict:
    """Every kernel on fresh random ragged inputs against the float64 reference."""
    lens = torch.tensor(args.check_lens, device=device)
    max_seq = -(-int(lens.max()) // FLASH_PAGE) * FLASH_PAGE
    cache = filled_cache(len(args.check_lens), max_seq, lens, dtype, device, args.backend, gen)
    q = torch.randn((lens.numel(), 1, MODEL["q_heads"], MODEL["head_dim"]), generator=gen, device=device).to(dtype)
    try:
        ref = reference(q, cache.k[0], cache.v[0], lens)
        out = {}
        for name, build in builders.items():
            if isinstance(build, Exception):
                out[name] = {"error": f"{type(build).__name__}: {build}"}
                continue
            try:
                got = build(q, cache.k[0], cache.v[0], lens, gen)()
                err = benchlib.rel_error(got, ref)
                out[name] = {"rel_error": err, "ok": err <= TOLERANCE[dtype]}
            except Exception as exc:
                out[name] = {"error": f"{type(exc).__name__}: {str(exc)[:300]}", "ok": False}
        return {"lens": args.check_lens, "tolerance": TOLERANCE[dtype], "kernels": out}
    finally:
        cache.close()


def time_shape(args, device, dtype, builders, batch: int, context: int, gen) -> dict:
    """Median milliseconds per decode call of every kernel at one (batch, context)."""
    clock = benchlib.Clock(device)
    lens = torch.full((batch,), context, device=device)
    cache = filled_cache(batch, context, lens, dtype, device, args.backend, gen)
    q = torch.randn((batch, 1, MODEL["q_heads"], MODEL["head_dim"]), generator=gen, device=device).to(dtype)
    row = {"batch": batch, "context": context, "ms": {}}
    try:
        for name, build in builders.items():
            if isinstance(build, Exception):
                continue
            try:
                run = build(q, cache.k[0], cache.v[0], lens, gen)
                for _ in range(args.warmup):
                    run()
                samples = []
                for _ in range(args.repeat):
                    t = clock.start()
                    for _ in range(args.inner):
                        run()
                    samples.append(clock.stop(t) / args.inner)
                row["ms"][name] = benchlib.summary(samples)["p50"]
            except Exception as exc:
                row["ms"][name] = None
                row.setdefault("errors", {})[name] = f"{type(exc).__name__}: {str(exc)[:300]}"
            finally:
                run = None
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    finally:
        cache.close()
    return row


def ratios(row: dict, names: list[str]) -> dict:
    """Time ratios (> 1: the contiguous side is faster): each paged kernel against pyvattn's own
    path (``names[0]``), and FlexAttention paged against itself on the contiguous cache."""
    ms, ours = row["ms"], names[0]
    out = {}
    for name in names[1:]:
        if name.startswith("paged") and ms.get(name) and ms.get(ours):
            out[f"{name.split(' (')[0]} / {ours}"] = ms[name] / ms[ours]
    paged_flex = next((n for n in names if n.startswith("paged flex")), None)
    if paged_flex and ms.get(paged_flex) and ms.get("contiguous flex"):
        out["flex: paged / contiguous"] = ms[paged_flex] / ms["contiguous flex"]
    return out


def coarse_first(batches: list[int], contexts: list[int]) -> list[tuple[int, int]]:
    """Every (batch, context), in an order that covers every batch and every context early: the
    diagonals of the grid one after another (a time-boxed run that stops half-way still has each
    batch size and each context length in it)."""
    n = max(len(batches), len(contexts))
    order = sorted(((i - j) % n, j, i) for i in range(len(batches)) for j in range(len(contexts)))
    return [(batches[i], contexts[j]) for _, j, i in order]


# --- report -------------------------------------------------------------------------------------
def render(result: dict) -> str:
    names = result["kernels"]
    lines = ["\nnumerics on ragged lengths "
             f"{result['numerics']['lens']} vs float64 (bound {result['numerics']['tolerance']:g}):"]
    for name, r in result["numerics"]["kernels"].items():
        lines.append(f"  {name}: " + (f"{r['rel_error']:.2e} {'ok' if r['ok'] else 'FAILED'}" if "rel_error" in r
                                      else r["error"]))
    if not result["shapes"]:
        lines.append(f"\ntiming: {result.get('timing', 'no shapes measured')}")
        return "\n".join(lines)
    ratio_names = sorted({k for row in result["shapes"] for k in row["ratios"]})
    head = ["batch", "context"] + [f"{n} ms" for n in names] + ratio_names
    shapes = sorted(result["shapes"], key=lambda r: (r["context"], r["batch"]))
    rows = [[r["batch"], r["context"]] + [f"{r['ms'][n]:.4f}" if r["ms"].get(n) else "-" for n in names]
            + [f"{r['ratios'][k]:.2f}x" if k in r["ratios"] else r.get("skipped", "-")[:30] for k in ratio_names]
            for r in shapes]
    lines += [f"\ndecode attention, {result['dtype']}, Hq {MODEL['q_heads']} Hkv {MODEL['kv_heads']} "
              f"D {MODEL['head_dim']} (median ms per call; ratio > 1: contiguous faster)", benchlib.table(head, rows)]
    return "\n".join(lines)


def plot(result: dict, path: Path) -> Path | None:
    """paged / contiguous against context, one line per batch and comparison."""
    plt = benchlib.pyplot()
    if plt is None:
        return None
    keys = sorted({k for row in result["shapes"] for k in row["ratios"]})
    if not keys:
        return None
    fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 4), squeeze=False)
    for ax, key in zip(axes[0], keys):
        for batch in sorted({r["batch"] for r in result["shapes"]}):
            pts = [(r["context"], r["ratios"][key]) for r in result["shapes"]
                   if r["batch"] == batch and key in r["ratios"]]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=f"batch {batch}")
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set(title=key, xlabel="context (tokens)", ylabel="time ratio", xscale="log")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    title = f"paged vs contiguous decode attention on {result['machine'].get('gpu')}"
    return benchlib.save_figure(plt, fig, title, path)


# --- main ---------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", type=benchlib.device_arg, default="cuda")
    ap.add_argument("--backend", default=None, help="KVCache backend (default: cuda-vmm on a GPU, host on the CPU)")
    ap.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    ap.add_argument("--batches", type=benchlib.csv_ints, default="1,16,64,256")
    ap.add_argument("--contexts", type=benchlib.csv_ints, default="1024,4096,16384,32768")
    ap.add_argument("--check-lens", type=benchlib.csv_ints, default="1,130,1000,2047",
                    help="ragged lengths of the numerics check")
    ap.add_argument("--max-gib", type=float, default=None,
                    help="skip shapes whose two K/V copies need more (default: 80%% of free device memory)")
    ap.add_argument("--time-budget", type=float, default=65.0,
                    help="seconds for the whole run; shapes not started by then are skipped (default 65)")
    ap.add_argument("--warmup", type=benchlib.nonnegative_int, default=3)
    ap.add_argument("--repeat", type=benchlib.positive_int, default=7)
    ap.add_argument("--inner", type=benchlib.positive_int, default=5, help="calls per timed sample")
    resultpath.add_output_arguments(ap, "bench_paged")
    ap.add_argument("--no-plot", action="store_true")
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    device = args.device
    if device.type == "cuda" and not torch.cuda.is_available():
        print("bench_paged.py: torch sees no CUDA GPU (use --device cpu for the numerics check)", file=sys.stderr)
        return 2
    t_start = time.perf_counter()
    args.backend = args.backend or ("cuda-vmm" if device.type == "cuda" else "host")
    dtype = getattr(torch, args.dtype)
    gen = torch.Generator(device=device).manual_seed(0)
    builders = kernels(device, dtype)
    result = {"machine": benchlib.machine_facts(device), "args": {k: str(v) for k, v in vars(args).items()},
              "dtype": args.dtype, "model": MODEL,
              "kernels": [n for n, b in builders.items() if not isinstance(b, Exception)],
              "unavailable": {n: str(b) for n, b in builders.items() if isinstance(b, Exception)},
              "flash_attn_installed": attention.flash_available(), "shapes": []}
    if not attention.flash_available():
        result["unavailable"]["paged flash-attn"] = "flash-attn is not installed here"
    out = Path(args.out)
    result["numerics"] = check_numerics(args, device, dtype, builders, gen)
    if device.type != "cuda":
        result["timing"] = "skipped: no GPU (the CPU run checks numerics only)"
    print(render(result), flush=True)
    if device.type != "cuda":
        benchlib.save_json(out, result)
        return verdict(result)
    free = torch.cuda.mem_get_info(device)[0]
    cap = (args.max_gib * 2**30) if args.max_gib else 0.8 * free
    itemsize = torch.empty((), dtype=dtype).element_size()
    for batch, context in coarse_first(args.batches, args.contexts):
        need = 2 * 2 * batch * context * MODEL["kv_heads"] * MODEL["head_dim"] * itemsize  # K+V, two copies
        if time.perf_counter() - t_start > args.time_budget:
            result["shapes"].append({"batch": batch, "context": context, "ms": {}, "ratios": {},
                                     "skipped": f"out of time (--time-budget {args.time_budget:g} s)"})
            continue
        if need > cap:
            result["shapes"].append({"batch": batch, "context": context, "ms": {}, "ratios": {},
                                     "skipped": f"needs {need / 2**30:.1f} GiB > {cap / 2**30:.1f} GiB"})
            continue
        row = time_shape(args, device, dtype, builders, batch, context, gen)
        row["ratios"] = ratios(row, result["kernels"])
        result["shapes"].append(row)
        print(f"batch {batch:>4} context {context:>6}: " + ", ".join(
            f"{n} {ms:.4f} ms" if ms else f"{n} failed" for n, ms in row["ms"].items())
            + f"  [{time.perf_counter() - t_start:.0f} s]", flush=True)
        benchlib.save_json(out, result)  # a time-boxed run keeps every finished shape
    print(render(result))
    benchlib.save_json(out, result)
    if not args.no_plot and plot(result, out.with_suffix(".png")):
        print(f"saved {out.with_suffix('.png')}")
    return verdict(result)


def verdict(result: dict) -> int:
    """1 if a kernel that ran gave wrong numbers, or if no paged kernel could run at all; else 0
    (a kernel that cannot run here is reported, not a failure: another may)."""
    checked = result["numerics"]["kernels"]
    wrong = [n for n, r in checked.items() if "rel_error" in r and not r["ok"]]
    paged_ran = [n for n, r in checked.items() if n.startswith("paged") and r.get("ok")]
    return 1 if wrong or not paged_ran else 0


if __name__ == "__main__":
    sys.exit(main())

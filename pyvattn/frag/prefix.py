"""Prefix sharing on traces that carry block hashes: which units of a scheme two requests can
share, and the pool of shared units with its cache of retained prefixes.

**Hashes.** Mooncake's ``hash_ids`` name the prompt's 512-token blocks (``HASH_BLOCK_TOKENS``),
the last one partial when the prompt is not a multiple of 512. Two requests hold the same tokens
in 512-token block ``i`` iff their hash chains agree up to ``i`` (a block's content is only known
up to its prefix, as in vLLM's chained block hashes, so equal ids at ``i`` after different earlier
ids are not the same block). The trailing partial block is assumed unique to its request (its
hash covers fewer than 512 tokens: a later request's block at that position holds other tokens),
and so are the tokens a request generates (the trace has no hashes for them). Only the first
``512 * (prompt // 512)`` tokens of a prompt can therefore be shared.

**Units.** A scheme allocates units of ``unit_bytes`` per region (one layer's K or V); a unit
holds ``unit_bytes / token_bytes`` tokens (a paged block of B tokens holds B; a vAttention page of
P bytes holds P / token_bytes, 1,024 for 2 MiB of Llama-3-8B). Unit ``k`` can be shared iff it
is full and lies entirely inside the hashed prefix: its bytes ``[k * unit, (k + 1) * unit)`` end
within the first ``512 * (prompt // 512)`` tokens. Its identity is the hash chain of the 512-token
block holding its last token, plus ``k``: so a block of B < 512 tokens inside 512-token block
``i`` is shared iff the chains match up to ``i``, and a unit spanning several 512-token blocks
iff they all match. Every region holds the same tokens in its unit ``k``, so a shared unit is
shared in all regions (a vAttention page aliased in every layer's K and V).

**Pool.** :class:`PrefixPool` is vLLM's automatic prefix caching (``vllm/v1/core/block_pool.py``)
at unit granularity: units are reference-counted, a unit whose last reference goes is kept in
the cache (if it can be shared) in least-recently-used order, a request's units from its tail
first (vLLM frees in reverse), and a unit that is needed while no free one is left evicts the
least recently used cached one. Budgets count a shared unit once.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from pathlib import Path

import numpy as np

from .traces import SHIPPED, SYNTHETIC, Trace, TraceError, load_trace, trace_path

HASH_BLOCK_TOKENS = 512  # Mooncake's hash_ids: one per 512 prompt tokens
_KEY_SHIFT = 24  # unit key = chain id << 24 | unit index (a slot holds < 2**24 units)


def load_hashed_trace(name: str | Path, limit: int | None = None) -> tuple[Trace, list[np.ndarray]]:
    """The trace (as :func:`~.traces.load_trace` reads it) and each request's hash chain: one
    int64 id per 512-token block of its prompt, interned so that equal ids mean equal prefixes.
    A trace without ``hash_ids`` (any CSV, a synthetic trace, a JSONL record without them) raises
    :class:`TraceError`, as does a malformed ``hash_ids`` (naming ``file:line``)."""
    if str(name).startswith(SYNTHETIC + ":"):
        raise TraceError(f"trace={str(name)!r}: --prefix-sharing needs block hashes (Mooncake JSONL "
                         f"hash_ids); a synthetic trace has none")
    trace = load_trace(name, limit)  # validates lengths and times
    path = trace_path(name)
    label = str(name) if str(name) not in SHIPPED else f"{name} ({path.name})"
    if path.suffix != ".jsonl":
        raise TraceError(f"{path}: --prefix-sharing needs block hashes (Mooncake JSONL hash_ids); "
                         f"trace {label} has none")
    chains: list[np.ndarray] = []
    interned: dict[tuple[int, int], int] = {}
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if len(chains) == len(trace):
                break
            if not line.strip():
                continue
            row = json.loads(line)
            if row["input_length"] + row["output_length"] == 0:
                continue  # load_trace drops requests without tokens
            chains.append(_chain(row, f"{path}:{line_no}", interned))
    return trace, chains


def _chain(row: dict, where: str, interned: dict[tuple[int, int], int]) -> np.ndarray:
    """Chain ids of one record's ``hash_ids`` (validated against its ``input_length``)."""
    if "hash_ids" not in row:
        raise TraceError(f"{where}: no hash_ids: --prefix-sharing needs them on every record")
    ids, prompt = row["hash_ids"], row["input_length"]
    if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
        raise TraceError(f"{where}: hash_ids={str(ids)[:60]} is not a list of whole numbers >= 0")
    blocks = -(-prompt // HASH_BLOCK_TOKENS)
    if len(ids) != blocks:
        raise TraceError(f"{where}: {len(ids)} hash_ids for input_length={prompt} "
                         f"(expected {blocks}, one per {HASH_BLOCK_TOKENS} tokens)")
    out, parent = np.empty(len(ids), dtype=np.int64), -1
    for i, block in enumerate(ids):
        parent = interned.setdefault((parent, block), len(interned))
        out[i] = parent
    return out


class UnitKeys:
    """Which units of one scheme a request can share: ``keys(chain, prompt)`` gives the keys of its
    shareable units in order (see the module docstring), ``max_hits(tokens)`` how many of them a
    request of ``tokens`` may take from the cache (vLLM computes at least the last token), and
    ``tokens(units)`` the tokens ``units`` leading units cover in full."""

    def __init__(self, unit_bytes: int, token_bytes: int, shareable: bool = True):
        self.unit_bytes, self.token_bytes, self.shareable = unit_bytes, token_bytes, shareable

    def units_for(self, tokens):
        """Units per region that ``tokens`` tokens occupy (an int or an array)."""
        return -(-tokens * self.token_bytes // self.unit_bytes)

    def full_units(self, tokens: int) -> int:
        """Units that lie entirely inside the first ``tokens`` tokens."""
        return tokens * self.token_bytes // self.unit_bytes

    def tokens(self, units: int) -> int:
        return units * self.unit_bytes // self.token_bytes

    def max_hits(self, tokens: int) -> int:
        return self.full_units(max(0, tokens - 1))

    def keys(self, chain: np.ndarray, prompt: int) -> list[int]:
        if not self.shareable:
            return []
        n = self.full_units(HASH_BLOCK_TOKENS * (prompt // HASH_BLOCK_TOKENS))
        k = np.arange(n, dtype=np.int64)
        last_token = ((k + 1) * self.unit_bytes - 1) // self.token_bytes
        return ((chain[last_token // HASH_BLOCK_TOKENS] << _KEY_SHIFT) | k).tolist()


def unbounded_shared_tokens(chains: list[np.ndarray], prompts: np.ndarray, keys: "UnitKeys") -> int:
    """Prompt tokens that requests would share with earlier ones, in trace order, if nothing
    were ever evicted: the upper bound the budget and the serving order leave room under. Each
    request shares its longest run of full 512-token blocks seen (as full blocks) before, in
    whole units, at most :meth:`UnitKeys.max_hits` units."""
    if not keys.shareable:
        return 0
    seen: set[int] = set()
    total = 0
    for chain, prompt in zip(chains, prompts.tolist()):
        full = chain[:prompt // HASH_BLOCK_TOKENS].tolist()
        matched = next((i for i, c in enumerate(full) if c not in seen), len(full))
        units = min(keys.full_units(HASH_BLOCK_TOKENS * matched), keys.max_hits(prompt))
        total += keys.tokens(units)
        seen.update(full)
    return total


class PrefixPool:
    """``capacity`` units (per region; every region alike) shared by reference count, with the
    cache of retained prefixes. Units are either free, *referenced* (by running requests: shared
    ones by key in ``refs``, private ones only counted) or *cached* (shareable, unreferenced,
    evicted least recently used first). ``free + cached + referenced == capacity`` always."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.refs: dict[int, int] = {}  # key -> references, for referenced shareable units
        self.cached: OrderedDict[int, None] = OrderedDict()  # least recently used first
        self.private = 0  # referenced units that cannot be shared
        self.evictions = 0

    @property
    def referenced(self) -> int:
        return len(self.refs) + self.private

    @property
    def free(self) -> int:
        return self.capacity - self.referenced - len(self.cached)

    def available(self) -> int:
        """Units a request could get now: free ones, and cached ones by eviction."""
        return self.capacity - self.referenced

    def hits(self, keys: list[int], limit: int) -> int:
        """How many of ``keys[:limit]`` are present, leading: the cached prefix (vLLM's
        ``find_longest_cache_hit``)."""
        refs, cached = self.refs, self.cached
        n = 0
        for key in keys[:limit]:
            if key not in refs and key not in cached:
                break
            n += 1
        return n

    def cost(self, keys: list[int], hits: int, units: int) -> int:
        """How much :meth:`acquire` of the same arguments takes from :meth:`available`: every
        unit not already referenced (a cached hit leaves the cache; others need a unit)."""
        refs = self.refs
        return units - sum(1 for key in keys[:hits] if key in refs)

    def acquire(self, keys: list[int], hits: int, units: int) -> list[int]:
        """Reference ``units`` units for a request whose shareable keys are ``keys``, the first
        ``hits`` from the cache; the rest are new (a new shareable unit whose key is already
        referenced, a duplicate, stays private, as vLLM keeps the first block of a hash). The
        caller checked that :meth:`cost` fits :meth:`available`. Returns the keys the request
        now references; its other ``units - len(result)`` units are private."""
        refs, cached = self.refs, self.cached
        held = []
        for i, key in enumerate(keys[:units]):
            if key in refs:
                if i >= hits:
                    continue  # a duplicate: private
                refs[key] += 1
            else:
                if key in cached:
                    del cached[key]  # a hit, or a computed unit whose copy was cached: reused
                refs[key] = 1
            held.append(key)
        self.private += units - len(held)
        self._evict_overdraft()
        return held

    def grow_private(self, units: int) -> None:
        """``units`` more private units (decode growth); the caller checked :meth:`available`."""
        self.private += units
        self._evict_overdraft()

    def _evict_overdraft(self) -> None:
        """Units just referenced beyond the free ones come from the cache, least recently used
        first (what is referenced was taken out of the cache before, so it is never evicted)."""
        short = -self.free
        if short > 0:
            if short > len(self.cached):
                raise AssertionError(f"pool over capacity by {short - len(self.cached)} units")
            for _ in range(short):
                self.cached.popitem(last=False)
            self.evictions += short

    def release(self, keys: list[int], private: int) -> None:
        """Drop a request's references: its ``keys`` (it holds them all) and ``private`` units.
        Units left unreferenced are cached, its tail least recently used (evicted first)."""
        refs, cached = self.refs, self.cached
        for key in reversed(keys):
            left = refs[key] - 1
            if left:
                refs[key] = left
            else:
                del refs[key]
                cached[key] = None
        self.private -= private

    def check(self) -> None:
        """Assert the books: nothing below zero or above capacity, no unit both cached and
        referenced."""
        assert self.private >= 0 and self.free >= 0, (self.private, self.free)
        assert not (self.refs.keys() & self.cached.keys())
        assert all(n > 0 for n in self.refs.values())

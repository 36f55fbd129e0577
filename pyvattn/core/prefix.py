"""PrefixIndex: which slots hold which prompt prefixes, found by a hash chain over page-sized
token blocks (as vLLM's automatic prefix caching hashes its blocks)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np


def block_hashes(tokens, block: int) -> list[bytes]:
    """The chain of a token sequence: block ``i`` (tokens ``[i * block, (i + 1) * block)``, full
    blocks only) hashes to ``H(hash of block i - 1, its tokens)``, so equal hashes at block ``i``
    mean equal tokens in every block up to ``i`` (BLAKE2b, 128 bits: a collision is not a
    practical concern)."""
    data = np.ascontiguousarray(np.asarray(tokens, dtype=np.int64))
    out, parent = [], b""
    for i in range(len(data) // block):
        parent = hashlib.blake2b(parent + data[i * block:(i + 1) * block].tobytes(), digest_size=16).digest()
        out.append(parent)
    return out


@dataclass(frozen=True)
class Match:
    """The longest cached prefix of a prompt: ``blocks`` full pages of ``slot``."""

    slot: int
    blocks: int


class PrefixIndex:
    """The prompt prefix each slot holds, by block hash, and when each was last used.

    A slot's chain is the hashes of its prompt's full blocks (one block = the tokens one page
    holds). Which of them are really there is the caller's to say (``held`` blocks: a running
    request's stepped length, a finished one's length at ``free_slot``, both capped by the pages
    the slot still holds), so reclaim never has to tell the index. ``used`` orders finished
    requests' slots for eviction, least recently used first.
    """

    def __init__(self, slots: int, block: int):
        self.block = block  # tokens per page; 0: pages do not hold whole tokens, no reuse
        self._chains: list[list[bytes]] = [[] for _ in range(slots)]
        self._by_first: dict[bytes, set[int]] = {}  # first block's hash -> slots whose chain starts so
        self.used = np.zeros(slots, dtype=np.int64)  # a tick of each slot's last use
        self.cached = np.zeros(slots, dtype=np.int64)  # prompt tokens present when the slot was claimed
        self.finished_len = np.zeros(slots, dtype=np.int64)  # tokens a finished request left written
        self._tick = 0

    def any(self) -> bool:
        """Whether any slot holds a prompt chain."""
        return bool(self._by_first)

    def hashes(self, tokens) -> list[bytes]:
        return block_hashes(tokens, self.block) if self.block else []

    def longest(self, chain: list[bytes], held_blocks) -> Match | None:
        """The slot holding the most leading blocks of ``chain`` (ties: the least recently used
        first, so a retained prefix keeps serving hits), or None. ``held_blocks(slot)`` says how
        many of a slot's chain it really holds."""
        if not chain:
            return None
        best: Match | None = None
        for slot in sorted(self._by_first.get(chain[0], ()), key=lambda s: self.used[s]):
            mine = self._chains[slot]
            most = min(len(mine), len(chain), held_blocks(slot))
            n = 0
            while n < most and mine[n] == chain[n]:
                n += 1
            if n and (best is None or n > best.blocks):
                best = Match(slot, n)
        return best

    def assign(self, slot: int, chain: list[bytes], cached_tokens: int) -> None:
        """``slot`` now holds a request whose prompt hashes to ``chain``, with ``cached_tokens`` of
        it already present."""
        self.forget(slot)
        self._chains[slot] = chain
        if chain:
            self._by_first.setdefault(chain[0], set()).add(slot)
        self.cached[slot] = cached_tokens
        self.touch(slot)

    def chain(self, slot: int) -> list[bytes]:
        return self._chains[slot]

    def finished(self, slot: int, length: int) -> None:
        """The request in ``slot`` finished having written ``length`` tokens; its prefix stays
        findable while the slot holds the pages."""
        self.finished_len[slot] = length
        self.cached[slot] = 0
        self.touch(slot)

    def forget(self, slot: int) -> None:
        chain = self._chains[slot]
        if chain:
            holders = self._by_first[chain[0]]
            holders.discard(slot)
            if not holders:
                del self._by_first[chain[0]]
        self._chains[slot] = []
        self.cached[slot] = self.finished_len[slot] = 0

    def touch(self, slot: int) -> None:
        self._tick += 1
        self.used[slot] = self._tick

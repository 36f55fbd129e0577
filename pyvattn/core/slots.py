"""SlotTable: which request slots are in use, how far each was stepped, and what a step asks."""

from __future__ import annotations

import operator
import struct
from typing import Mapping

import numpy as np
import torch


class SlotTable:
    """The only record of which slots are in use (``active``) and of each one's stepped length
    (``lengths``: the largest length given to ``step`` since the slot was claimed; 0 when free).
    Lengths never shrink: the pages under tokens already written must stay.

    ``parse`` is the one validator of ``step()`` input, for every form it takes; input indexed by
    slot comes back with ``slots`` = ``every`` (all slots, in order), which ``record`` takes as
    "no gather needed".
    """

    def __init__(self, size: int, max_len: int):
        self.size, self.max_len = size, max_len
        self.active = np.zeros(size, dtype=bool)
        self.lengths = np.zeros(size, dtype=np.int64)
        self.every = np.arange(size, dtype=np.int64)
        self._limit = np.zeros(size, dtype=np.uint64)  # the longest length each slot may be given
        self._packers: dict[int, struct.Struct] = {}

    def claim(self, slot: int) -> None:
        self.active[slot] = True
        self.lengths[slot] = 0
        self._limit[slot] = self.max_len

    def release(self, slot: int) -> None:
        self.active[slot] = False
        self.lengths[slot] = 0
        self._limit[slot] = 0

    def record(self, slots: np.ndarray, lens: np.ndarray) -> None:
        if slots is self.every:
            np.maximum(self.lengths, lens, out=self.lengths)
        else:
            self.lengths[slots] = np.maximum(self.lengths[slots], lens)

    def check_slot(self, slot, name: str = "slot") -> int:
        if isinstance(slot, (bool, np.bool_)) or not isinstance(slot, (int, np.integer)) \
                or not 0 <= slot < self.size:
            raise ValueError(f"{name}={slot!r} is not a slot id in [0, {self.size})")
        return int(slot)

    def parse(self, seq_lens, capacity: np.ndarray) -> tuple[np.ndarray, np.ndarray, bool]:
        """``seq_lens`` ({slot: length}, or a sequence/array/tensor indexed by slot, 0 for free
        slots) as (slots, lengths) int64 arrays, checked: slot ids of allocated slots, integer
        lengths in ``[0, max_len]`` (``ValueError`` naming ``seq_lens`` otherwise); and whether any
        length exceeds its slot's ``capacity`` (tokens it holds pages for: never above
        ``max_len``, so only such a step needs the upper bound checked)."""
        if type(seq_lens) is dict:
            return self._parse_mapping(seq_lens, capacity)
        if isinstance(seq_lens, Mapping):
            return self._parse_mapping(dict(seq_lens), capacity)
        if isinstance(seq_lens, torch.Tensor):
            seq_lens = seq_lens.numpy() if seq_lens.device.type == "cpu" else seq_lens.detach().cpu().numpy()
        return self._parse_vector(np.asarray(seq_lens), capacity)

    def _parse_mapping(self, lens_by_slot: dict, capacity: np.ndarray):
        n = len(lens_by_slot)
        if n == 0:
            return self.every[:0], self.every[:0], False
        packer = self._packers.get(n)
        if packer is None:
            packer = self._packers[n] = struct.Struct(f"<{n}Q{n}I")
        try:
            # one C pass over the lengths (u64) and slot ids (u32) that refuses anything but
            # integers >= 0 (floats, strings, None, negatives); numpy integers pass (__index__)
            packed = packer.pack(*lens_by_slot.values(), *lens_by_slot)
        except struct.error:
            self._diagnose(lens_by_slot)
        lens = np.frombuffer(packed, dtype=np.int64, count=n)  # >= 2**63 reads negative: refused below
        slots = np.frombuffer(packed, dtype=np.uint32, offset=8 * n).astype(np.intp)
        try:
            if not self.active[slots].all():
                self._check_slots(slots)  # raises, naming what is wrong
        except IndexError:
            self._check_slots(slots)
        # a bool packs as 0 or 1: only then is it worth looking at the objects themselves
        shortest = lens.min()
        if shortest < 0:
            self._check_lengths(lens)
        if ((0 in lens_by_slot or 1 in lens_by_slot) and _has_bool_key(lens_by_slot)) or \
                (shortest <= 1 and bool in set(map(type, lens_by_slot.values()))):
            raise ValueError("seq_lens: slot ids and lengths must be integers, not bools")
        grows = bool((lens > capacity[slots]).any())
        if grows:
            self._check_lengths(lens)
        return slots, lens, grows

    def _parse_vector(self, lens: np.ndarray, capacity: np.ndarray):
        if lens.shape != (self.size,) or lens.dtype.kind not in "iu":
            raise ValueError(f"seq_lens must be a mapping slot -> length or an integer sequence of length "
                             f"max_batch_size={self.size}, got shape {lens.shape} dtype {lens.dtype}")
        lens = lens.astype(np.int64, copy=False)
        # free slots' limit is 0 and, viewed unsigned, a negative length is huge: one comparison
        if (lens.view(np.uint64) > self._limit).any():
            stray = np.flatnonzero((lens != 0) & ~self.active)
            if len(stray):
                raise ValueError(f"seq_lens: slots {stray[:4].tolist()} are not allocated (alloc_slot first)")
            self._check_lengths(lens)
        return self.every, lens, bool((lens > capacity).any())

    def _diagnose(self, lens_by_slot: dict) -> None:
        """Raise the ValueError that says what is wrong with input the fast pack refused."""
        try:
            slots = np.array([operator.index(k) for k in lens_by_slot], dtype=np.int64)
            lens = np.array([operator.index(v) for v in lens_by_slot.values()], dtype=np.int64)
        except (TypeError, OverflowError):
            raise ValueError("seq_lens: slot ids and lengths must be integers") from None
        self._check_slots(slots)
        self._check_lengths(lens)
        raise ValueError("seq_lens: slot ids and lengths must be integers")

    # viewed unsigned, a negative number is huge: one comparison checks both bounds
    def _check_slots(self, slots: np.ndarray) -> None:
        if (slots.view(np.uint64) >= self.size).any():
            raise ValueError(f"seq_lens: slot ids must lie in [0, {self.size})")
        if not self.active[slots].all():
            bad = slots[~self.active[slots]][:4].tolist()
            raise ValueError(f"seq_lens: slots {bad} are not allocated (alloc_slot first)")

    def _check_lengths(self, lens: np.ndarray) -> None:
        if (lens.view(np.uint64) > self.max_len).any():
            raise ValueError(f"seq_lens: lengths must lie in [0, max_seq_len={self.max_len}]")


def _has_bool_key(lens_by_slot: dict) -> bool:
    """Whether slot 0 or 1 is given as False/True (bools pack as 0/1; numpy bools do not pack)."""
    for small in (0, 1):
        probe = _StoredKey(small)
        if probe in lens_by_slot and type(probe.stored) is bool:
            return True
    return False


class _StoredKey:
    """Finds the object a dict holds as the key equal to ``value`` in O(1), with no copy of the
    keys: looking this probe up (same hash) makes the dict compare its stored key with it, and
    ``__eq__`` keeps that object."""

    __slots__ = ("value", "stored")

    def __init__(self, value: int):
        self.value, self.stored = value, None

    def __hash__(self) -> int:
        return hash(self.value)

    def __eq__(self, other) -> bool:
        self.stored = other
        return other == self.value

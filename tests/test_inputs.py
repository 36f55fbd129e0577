"""Bad input: a ValueError naming the argument, and nothing changed."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pyvattn import BackendUnavailable, KVCache
from pyvattn.units import format_size, parse_size

GOOD = dict(num_layers=2, num_kv_heads=2, head_dim=16, max_batch_size=4, max_seq_len=256,
            dtype=torch.float16, device="cpu")


@pytest.mark.parametrize("arg,value", [
    ("num_layers", 0), ("num_kv_heads", -1), ("head_dim", 1.5), ("max_batch_size", True),
    ("max_seq_len", "256"), ("dtype", torch.int32), ("dtype", "float16"),
    ("page_size", 1000), ("page_size", "64 parsecs"), ("page_size", 0),
    ("page_size", 4096.0), ("page_size", 1 << 40), ("page_size", None),  # the review's item 8
    ("deferred_reclaim", "no"), ("deferred_reclaim", 1), ("deferred_reclaim", None),
    ("memory_budget", "lots"), ("memory_budget", -1), ("memory_budget", 1e9),
    ("backend", "nope"), ("device", "gpu:0"),
])
def test_constructor_rejects_bad_arguments(arg, value):
    with pytest.raises(ValueError, match=arg):
        KVCache(**{**GOOD, arg: value})


def test_named_backend_that_cannot_run_says_why():
    with pytest.raises(BackendUnavailable, match="cuda-vmm"):
        KVCache(**{**GOOD, "backend": "cuda-vmm"})  # a CPU device (and no GPU here)


@pytest.fixture
def cache():
    with KVCache(**GOOD) as c:
        yield c


@pytest.mark.parametrize("slot", [-1, 4, 99, "0", 1.0, None])
def test_bad_slot_ids(cache, slot):
    with pytest.raises(ValueError, match="slot"):
        cache.free_slot(slot)


def test_double_free(cache):
    s = cache.alloc_slot()
    cache.free_slot(s)
    with pytest.raises(ValueError, match="double free"):
        cache.free_slot(s)


def test_step_validation_changes_nothing(cache):
    s = cache.alloc_slot()
    cache.step({s: 10})
    before = cache.stats()
    for bad in ({s: 257}, {s: -1}, {s + 1: 5}, {7: 5}, [1, 2], torch.zeros(4, dtype=torch.float32)):
        with pytest.raises(ValueError, match="seq_lens"):
            cache.step(bad)
        with pytest.raises(ValueError, match="seq_lens"):
            cache.step_async(bad)
    assert cache.stats() == before


@pytest.mark.parametrize("seq_len", [1000, -1, 1.5, "8", True])
def test_alloc_slot_hint_is_checked(cache, seq_len):
    with pytest.raises(ValueError, match="seq_len"):
        cache.alloc_slot(seq_len=seq_len)
    assert cache.stats()["active_slots"] == 0


def test_float_slot_ids_take_the_validating_path(cache):
    s = cache.alloc_slot()
    cache.step({s: 10})  # maps a page: 12 tokens would fit without mapping
    for bad in ({float(s): 12}, {s: 12.0}):
        with pytest.raises(ValueError, match="seq_lens"):
            cache.step(bad)
    assert cache.seq_len(s) == 10


def test_reserve_rejects_negative_sizes(cache):
    with pytest.raises(ValueError, match="nbytes"):
        cache.reserve(-4096)


def test_a_reservation_too_big_for_the_address_space_names_the_arguments():
    """The review: a huge reservation failed as a bare ``mmap ENOMEM`` naming no argument."""
    with pytest.raises(ValueError, match="max_seq_len=68719476736") as info:
        KVCache(1, 8, 128, 1, 1 << 36, torch.float16, device="cpu")  # 2 x 128 TiB of address space
    assert "ENOMEM" in str(info.value)


@pytest.mark.parametrize("bad", [{0: True}, {0: False}, {True: 40}, {False: 40}, {0: 40, 1: True}])
def test_bool_slot_ids_and_lengths_are_refused_whether_or_not_anything_needs_mapping(bad):
    """The review's bool_fastpath: {s: True} passed when the slot had capacity (the fast path) and
    was refused when it had none."""
    with KVCache(**GOOD) as cache:
        a, b = cache.alloc_slot(), cache.alloc_slot()
        for _ in ("no capacity", "capacity"):
            with pytest.raises(ValueError, match="seq_lens"):
                cache.step(bad)
            cache.step({a: 64, b: 64})
        assert cache.seq_len(a) == 64


def test_numpy_integer_slot_ids_and_lengths_are_integers(cache):
    s = cache.alloc_slot()
    cache.step({np.int64(s): np.int32(10)})
    cache.step({s: np.uint16(12)})
    assert cache.seq_len(s) == 12


def test_sizes():
    assert parse_size("64KiB", "x") == 65536 and parse_size("2MiB", "x") == 2 << 20
    assert parse_size("1.5GiB", "x") == 3 << 29 and parse_size(4096, "x") == 4096
    assert parse_size("1TB", "x") == parse_size("1TiB", "x") == 1 << 40  # the review: "1TB" was refused
    assert parse_size("1GB", "x") == 1 << 30 and parse_size(np.int64(7), "x") == 7
    assert format_size(65536) == "64 KiB" and format_size(3 << 29) == "1.5 GiB"
    with pytest.raises(ValueError, match="budget"):
        parse_size("0.3B", "budget")

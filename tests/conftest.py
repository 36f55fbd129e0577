"""Shared fixtures: the core suite runs on every backend that can run here.

``backend_device`` yields (backend name, device) for host always, and for cuda-vmm / uvm64k when
their probe answers (a GPU session runs the same data-integrity tests on real device memory).
"""

from __future__ import annotations

import signal
import threading

import pytest
import torch

from pyvattn import KVCache, backends

# Ctrl-C is KeyboardInterrupt in the tests, and the default in the processes they start (exec
# resets a handled signal), also when the suite runs as a background job, which inherits SIGINT
# ignored: the Ctrl-C tests would send it and see nothing happen.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN and threading.current_thread() is threading.main_thread():
    signal.signal(signal.SIGINT, signal.default_int_handler)

_BACKENDS = [
    pytest.param(("host", "cpu"), id="host"),
    pytest.param(("cuda-vmm", "cuda"), id="cuda-vmm", marks=pytest.mark.gpu),
    pytest.param(("uvm64k", "cuda"), id="uvm64k", marks=[pytest.mark.gpu, pytest.mark.uvm64k]),
]


@pytest.fixture(params=_BACKENDS)
def backend_device(request) -> tuple[str, str]:
    name, device = request.param
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip(f"{name}: no CUDA device visible to torch")
    probe = backends.probe(name, torch.device(device))
    if not probe.available:
        pytest.skip(f"{name} unavailable here: {probe.reason}")
    return name, device


@pytest.fixture
def make_cache(backend_device):
    """Build KVCaches on the parametrized backend; all are closed at teardown.

    Defaults: float32 (exact values) and a token size of page_size / 32 whatever the backend's page
    (4 KiB on the host, 64 KiB on uvm64k, 2 MiB on cuda-vmm), so every backend sees the same page
    geometry: 32 tokens per page, and a few hundred tokens cross many page boundaries.
    """
    name, device = backend_device
    made: list[KVCache] = []
    page_size = 4096 if name == "host" else \
        backends.backend_class(name).default_page_size(torch.device(device))

    def make(**kw) -> KVCache:
        args = dict(num_layers=3, num_kv_heads=2, head_dim=page_size // 256, max_batch_size=6,
                    max_seq_len=1000, dtype=torch.float32, device=device, backend=name,
                    page_size=page_size)
        args.update(kw)
        cache = KVCache(**args)
        made.append(cache)
        return cache

    yield make
    for cache in made:
        cache.close()

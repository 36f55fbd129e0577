"""KV-cache allocation schemes: what each allocates, and the set compared by default.

Every scheme is the same mechanism at a different granularity: each request slot owns, in each of
``2 * num_layers`` regions (K and V of every layer), a number of fixed-size units of ``unit_bytes``.

* static reservation (Orca, FasterTransformer): one unit of ``max_len`` tokens per region;
* PagedAttention with blocks of B tokens: units of ``B * token_bytes``;
* vAttention with pages of P bytes: units of P bytes (``P / token_bytes`` tokens, possibly
  fractional), optionally with deferred reclaim.

:class:`~.memory.UnitMemory` simulates a scheme's memory.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..units import format_size

KiB, MiB = 1 << 10, 1 << 20


@dataclass(frozen=True)
class Scheme:
    """An allocation scheme: ``kind`` is "static", "paged" (``block_tokens``) or "vattn"
    (``page_bytes``); ``deferred_reclaim`` keeps a finished request's units for the next one."""

    kind: str
    block_tokens: int = 0
    page_bytes: int = 0
    deferred_reclaim: bool = False
    label: str = ""  # overrides the derived name

    @property
    def name(self) -> str:
        if self.label:
            return self.label
        if self.kind == "static":
            return "static (max length)"
        if self.kind == "paged":
            return f"paged {self.block_tokens}-token blocks"
        base = f"vAttention {format_size(self.page_bytes).replace(' ', '')}"
        return base + (" + deferred reclaim" if self.deferred_reclaim else "")

    def unit_bytes(self, token_bytes: int, max_len: int) -> int:
        """Bytes of one allocation unit in one region (one layer's K or V)."""
        if self.kind == "static":
            return max_len * token_bytes
        if self.kind == "paged":
            return self.block_tokens * token_bytes
        return self.page_bytes


def on_os_pages(scheme: Scheme, token_bytes: int, max_len: int, os_page: int = 4096) -> Scheme:
    """``scheme`` with a unit that is a whole number of OS pages, as a host cache needs. Only static
    reservation can need a change: one page of ``max_len`` tokens rounded up behaves exactly like a
    reservation of ``max_len`` tokens (every length up to ``max_len`` needs exactly one unit)."""
    unit = scheme.unit_bytes(token_bytes, max_len)
    if unit % os_page == 0:
        return scheme
    if scheme.kind != "static":
        raise ValueError(f"scheme={scheme.name!r}: a unit of {unit} B is not a whole number of {os_page} B pages")
    rounded = -(-unit // os_page) * os_page
    return Scheme("vattn", page_bytes=rounded, label=f"{scheme.name}, {format_size(rounded)} page")


DEFAULT_SCHEMES: tuple[Scheme, ...] = (
    Scheme("static"),
    Scheme("paged", block_tokens=16),
    Scheme("paged", block_tokens=32),
    Scheme("paged", block_tokens=256),
    *(Scheme("vattn", page_bytes=p) for p in (64 * KiB, 128 * KiB, 256 * KiB, 2 * MiB)),
    *(Scheme("vattn", page_bytes=p, deferred_reclaim=True) for p in (64 * KiB, 128 * KiB, 256 * KiB, 2 * MiB)),
)

"""Byte sizes as people write them: ``64KiB``, ``2MiB``, ``40GiB``, ``65536``."""

from __future__ import annotations

import re

import numpy as np

_UNITS = {"": 1, "b": 1, **{prefix + suffix: 1 << (10 * power)
                           for power, prefix in enumerate("kmgtp", start=1) for suffix in ("", "b", "ib")}}


def parse_size(value: int | str, name: str) -> int:
    """Bytes in ``value`` (an int, or a string such as ``"64KiB"``); ``ValueError`` naming ``name``.

    Units are binary (``KB`` means KiB), as memory sizes are everywhere in this project.
    """
    if isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{name}={value!r} is not a size")
    if isinstance(value, (int, np.integer)):
        return int(value)
    if not isinstance(value, str):
        raise ValueError(f"{name}={value!r} is not a size: give an integer number of bytes or a "
                         f"string such as '64KiB'")
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", value)
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"{name}={value!r} is not a size (examples: 65536, '64KiB', '2MiB', '40GiB')")
    nbytes = float(m.group(1)) * _UNITS[m.group(2).lower()]
    if nbytes != int(nbytes):
        raise ValueError(f"{name}={value!r} is not a whole number of bytes")
    return int(nbytes)


def format_size(nbytes: int) -> str:
    """``65536`` -> ``'64 KiB'``; exact binary units where they fit, else one decimal."""
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(nbytes) >= scale:
            q = nbytes / scale
            return f"{q:.0f} {unit}" if q == int(q) else f"{q:.1f} {unit}"
    return f"{nbytes} B"

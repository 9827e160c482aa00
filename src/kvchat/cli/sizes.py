"""Byte sizes written by people: ``256M``, ``1.5GiB``, ``0``."""

from __future__ import annotations

import re

_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_PATTERN = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:I?B)?\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """Bytes in `text`: a number with an optional binary unit (K, M, G, T; ``iB``/``B`` optional).

    Raises ValueError for anything else.
    """
    match = _PATTERN.match(text)
    if not match:
        raise ValueError(f"not a size: {text!r} (examples: 0, 512M, 2G)")
    number, unit = match.groups()
    return int(float(number) * _UNITS[unit.upper()])


def format_size(size: int) -> str:
    """`size` bytes as `parse_size` reads them, in the largest unit that is exact: ``256M``, ``4G``, ``1000``."""
    if size < 0:
        raise ValueError(f"not a size: {size}")
    for unit in ("T", "G", "M", "K"):
        if size and size % _UNITS[unit] == 0:
            return f"{size // _UNITS[unit]}{unit}"
    return str(size)

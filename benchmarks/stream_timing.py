"""Timing an engine stream's decode, shared by the benchmarks."""

from __future__ import annotations

import time
from collections.abc import Iterable

from kvchat.engine import Chunk


def decode_span(stream: Iterable[Chunk]) -> tuple[int, float]:
    """Read `stream` to its end: (tokens after the first, seconds from the first token
    to the last). Speculation and grammars change the answer's decode, not the
    prompt's evaluation, which ends at the first token."""
    first = last = None
    count = 0
    for chunk in stream:
        now = time.perf_counter()
        if chunk.token_ids:
            first = first or now
            last = now
            count += len(chunk.token_ids)
    if first is None or last is None:
        return 0, 0.0
    return count - 1, last - first

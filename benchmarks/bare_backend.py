"""Timing llama.cpp itself, next to kvchat, in the same run: shared by the benchmarks.

A thread that has run `llama_decode` keeps an OpenMP team while it lives, and
while two such teams exist in a process every decode synchronises its threads
more slowly (see benchmarks/embedding_interference.py). So bare calls made
next to an engine run on a thread that ends with them (`on_own_thread`).
"""

from __future__ import annotations

import statistics
import threading
import time
from collections.abc import Callable, Sequence
from typing import TypeVar

from kvchat.llama import Batch, Context

T = TypeVar("T")


def on_own_thread(fn: Callable[..., T], *args: object) -> T:
    """`fn(*args)` on a thread that ends with it; its error is raised here."""
    out: list = []

    def run() -> None:
        try:
            out.append(fn(*args))
        except BaseException as exc:  # noqa: BLE001 - raised again on the caller's thread
            out.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    if isinstance(out[0], BaseException):
        raise out[0]
    return out[0]


def evaluate(ctx: Context, batch: Batch, tokens: Sequence[int], start: int = 0, seq_id: int = 0) -> None:
    """Decode `tokens[start:]` at their positions in chunks of the batch's capacity,
    with logits for the last token only."""
    for first in range(start, len(tokens), batch.capacity):
        chunk = list(tokens[first : first + batch.capacity])
        batch.clear()
        batch.add_chunk(chunk, first, seq_id, logits_last=first + len(chunk) == len(tokens))
        ctx.decode(batch)


def row_call_seconds(ctx: Context, batch: Batch, tokens: Sequence[int], position: int,
                     row_counts: Sequence[int], reps: int) -> dict[int, float]:
    """Median seconds of a `llama_decode` of n rows of sequence 0 at `position` (the
    cells before it already evaluated), every row asking for logits as a verify does,
    for each n of `row_counts`: the row counts interleaved so that drift hits all
    alike, a first round to warm up, then `reps` rounds. The rows hold `tokens`
    (repeated if short) and are removed after each call."""
    samples: dict[int, list[float]] = {rows: [] for rows in row_counts}
    for rep in range(reps + 1):
        for rows in row_counts:
            batch.clear()
            for i in range(rows):
                batch.add(tokens[i % len(tokens)], position + i, 0, logits=True)
            started = time.perf_counter()
            ctx.decode(batch)
            elapsed = time.perf_counter() - started
            ctx.seq_remove(0, position, -1)
            if rep:
                samples[rows].append(elapsed)
    return {rows: statistics.median(times) for rows, times in samples.items()}

"""`ContextShift`: a prompt shortened to fit by dropping tokens after a kept prefix."""

from __future__ import annotations

import math
from dataclasses import dataclass

from kvchat.errors import ContextOverflowError

SHIFTED_NAMESPACE_SUFFIX = "\x00shifted"
"""Shifted KV is an approximation (the kept tail was computed while the dropped
tokens were still there), so it is cached apart from exact KV of the same tokens."""


@dataclass(frozen=True)
class ContextShift:
    """`original` with `n_drop` tokens removed after its first `n_keep`.

    The engine builds the shortened prompt's KV from the original's cached KV:
    it copies the cells, removes the dropped positions (`llama_memory_seq_rm`) and
    moves the rest back (`llama_memory_seq_add`), like llama.cpp's context shift.
    """

    original: tuple[int, ...]
    n_keep: int
    n_drop: int

    @property
    def prompt(self) -> tuple[int, ...]:
        """The shortened prompt."""
        return self.original[: self.n_keep] + self.original[self.n_keep + self.n_drop :]

    @classmethod
    def to_fit(cls, original: tuple[int, ...], n_keep: int, budget: int) -> ContextShift:
        """Drop the oldest half of what follows `n_keep` (in whole halves) until the
        prompt fits in `budget` tokens.

        The drop grows in steps of half the room after `n_keep`, so the calls of a
        growing conversation share the same cut (and so their cached prefix) until
        the next step is needed.
        """
        half = (budget - n_keep) // 2
        if half < 1:
            raise ContextOverflowError(prompt_tokens=len(original), max_tokens=0, context_limit=budget)
        excess = len(original) - budget
        n_drop = max(0, math.ceil(excess / half) * half)
        return cls(original, n_keep, n_drop)


def shifted_namespace(cache_key: str | None) -> str:
    """The prefix-cache namespace for shifted KV of a tenant."""
    return (cache_key or "") + SHIFTED_NAMESPACE_SUFFIX

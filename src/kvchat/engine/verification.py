"""`verify_draft`: which sampled tokens a verified draft yields, and which cells it keeps."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Verdict:
    """The outcome of verifying a draft of `drafted` tokens.

    `tokens` are the sampled tokens to emit: one per accepted drafted token, and
    the one sampled after the last accepted (or in place of the first rejected).
    """

    tokens: tuple[int, ...]
    drafted: int

    @property
    def accepted(self) -> int:
        """Drafted tokens that matched what was sampled (their cells stay)."""
        return len(self.tokens) - 1

    @property
    def rejected(self) -> int:
        """Drafted tokens whose cells must go."""
        return self.drafted - self.accepted

    @staticmethod
    def cells_kept_if_ending_at(index: int) -> int:
        """Accepted drafted cells to keep should `tokens[index]` end the request:
        those of the tokens emitted before it, as decoding without a draft would hold."""
        return index


def verify_draft(pick: Callable[[int], int], row: int, draft: tuple[int, ...]) -> Verdict:
    """Sample at the last token's row and at each drafted row while the draft
    matches. `pick(row)` samples from a batch row (the sampler records the pick).

    Sampling a token and accepting the drafted one when they agree keeps the
    output's distribution for a deterministic draft (see `Speculator`).
    """
    emitted = [pick(row)]
    while len(emitted) <= len(draft) and emitted[-1] == draft[len(emitted) - 1]:
        emitted.append(pick(row + len(emitted)))
    return Verdict(tuple(emitted), len(draft))

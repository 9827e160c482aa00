"""`PinnedSequence`: a KV sequence held for a conversation, never evicted."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(eq=False)
class PinnedSequence:
    """A conversation's KV sequence: `tokens` are resident at positions [0, len).

    `own_cells` counts the cells only this sequence is charged for: a fork
    shares its parent's cells up to `fork_point` and is charged for nothing
    until it adds tokens of its own. Owned by the engine's worker thread.
    """

    seq_id: int
    tokens: list[int] = field(default_factory=list)
    own_cells: int = 0
    parent: PinnedSequence | None = None
    fork_point: int = 0
    children: list[PinnedSequence] = field(default_factory=list)
    unevaluated: list[int] = field(default_factory=list)
    """Tokens of the last reply that were sampled but never evaluated."""
    generating: bool = False
    closed: bool = False

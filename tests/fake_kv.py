"""`FakeKV`: a stand-in for `kvchat.llama.Context`'s KV memory, for pool tests without a model.

It models llama.cpp's unified KV cache the way the pool relies on it: a cell
holds one token at one position and may belong to several sequences
(``seq_cp`` shares cells, it does not copy them); ``seq_rm`` drops a
sequence's cells in a range; ``seq_add`` moves positions in place, which is
only sound on cells no other sequence holds (the fake refuses otherwise);
``seq_state``/``set_seq_state`` round-trip one sequence's tokens. Every memory
operation is recorded in `calls`. With ``partial_remove=False`` it behaves like
recurrent memory: a sequence's cells can be dropped only all at once.
"""

from __future__ import annotations

import itertools
import json

from kvchat.errors import BackendError


class FakeKV:
    """KV memory of a fake context: `n_ctx` cells and `n_seq_max` sequence ids."""

    def __init__(self, *, n_ctx: int = 256, n_seq_max: int = 8, can_shift: bool = True,
                 partial_remove: bool = True) -> None:
        self.n_ctx = n_ctx
        self.n_seq_max = n_seq_max
        self.can_shift = can_shift
        self.partial_remove = partial_remove
        self.calls: list[tuple[object, ...]] = []
        self._cells: dict[int, int] = {}  # cell id -> token
        self._seqs: dict[int, dict[int, int]] = {}  # seq id -> {position: cell id}
        self._ids = itertools.count()

    # -- the Context interface the pool uses -------------------------------------------------

    def seq_copy(self, src: int, dst: int, start: int = -1, end: int = -1) -> None:
        self.calls.append(("cp", src, dst, start, end))
        target = self._seqs.setdefault(dst, {})
        for pos, cell in self._seqs.get(src, {}).items():
            if _within(pos, start, end) and target.get(pos) != cell:
                assert pos not in target, f"seq_cp onto position {pos} of {dst}: llama.cpp would keep both cells"
                target[pos] = cell

    def seq_remove(self, seq_id: int, start: int = -1, end: int = -1) -> bool:
        self.calls.append(("rm", seq_id, start, end))
        whole = start <= 0 and end < 0
        if not whole and not self.partial_remove:
            return False
        cells = self._seqs.get(seq_id, {})
        for pos in [p for p in cells if _within(p, start, end)]:
            del cells[pos]
        self._collect()
        return True

    def seq_shift(self, seq_id: int, start: int, end: int, delta: int) -> None:
        self.calls.append(("add", seq_id, start, end, delta))
        cells = self._seqs[seq_id]
        moving = {pos: cell for pos, cell in cells.items() if _within(pos, start, end)}
        for cell in moving.values():
            holders = [s for s, held in self._seqs.items() if s != seq_id and cell in held.values()]
            assert not holders, f"seq_add on cell {cell} that sequences {holders} share: their positions would move too"
        for pos in moving:
            del cells[pos]
        for pos, cell in moving.items():
            assert pos + delta not in cells, f"seq_add moves position {pos} onto an occupied one"
            cells[pos + delta] = cell

    def seq_state(self, seq_id: int) -> bytes:
        self.calls.append(("state", seq_id))
        return json.dumps(self.tokens_by_position(seq_id)).encode()

    def set_seq_state(self, seq_id: int, state: bytes) -> None:
        self.calls.append(("set_state", seq_id))
        try:
            items = json.loads(state)
        except ValueError as exc:
            raise BackendError("fake: unreadable state") from exc
        self._seqs[seq_id] = {}
        self._collect()
        self.write(seq_id, {int(pos): token for pos, token in items.items()})

    def seq_pos_max(self, seq_id: int) -> int:
        return max(self._seqs.get(seq_id, {}), default=-1)

    @staticmethod
    def state_of_tokens(tokens: list[int]) -> bytes:
        """The bytes `seq_state` gives for a sequence holding `tokens` from position 0."""
        return json.dumps({str(pos): token for pos, token in enumerate(tokens)}).encode()

    def layout_key(self) -> str:
        return "fake-layout"

    # -- what a decode would do, and what tests look at ---------------------------------------

    def write(self, seq_id: int, tokens_at: dict[int, int]) -> None:
        """Evaluate tokens into `seq_id`: one new cell per position."""
        cells = self._seqs.setdefault(seq_id, {})
        for pos, token in tokens_at.items():
            assert pos not in cells, f"sequence {seq_id} already holds position {pos}"
            cell = next(self._ids)
            self._cells[cell] = token
            cells[pos] = cell
        assert len(self._cells) <= self.n_ctx, f"{len(self._cells)} cells in use, the context has {self.n_ctx}"

    def append(self, seq_id: int, start: int, tokens: list[int] | tuple[int, ...]) -> None:
        """Evaluate `tokens` into `seq_id` at positions from `start`."""
        self.write(seq_id, {start + i: t for i, t in enumerate(tokens)})

    def tokens_by_position(self, seq_id: int) -> dict[str, int]:
        return {str(pos): self._cells[cell] for pos, cell in sorted(self._seqs.get(seq_id, {}).items())}

    def tokens(self, seq_id: int) -> list[int]:
        """`seq_id`'s tokens, which must sit at positions [0, n) without a gap."""
        cells = self._seqs.get(seq_id, {})
        assert sorted(cells) == list(range(len(cells))), f"sequence {seq_id} has gaps: {sorted(cells)}"
        return [self._cells[cells[pos]] for pos in range(len(cells))]

    def cells_used(self) -> int:
        """Distinct cells held by any sequence."""
        return len(self._cells)

    def holds_anything(self, seq_id: int) -> bool:
        return bool(self._seqs.get(seq_id))

    def _collect(self) -> None:
        """Free the cells no sequence holds any more."""
        held = {cell for cells in self._seqs.values() for cell in cells.values()}
        for cell in [c for c in self._cells if c not in held]:
            del self._cells[cell]


def _within(pos: int, start: int, end: int) -> bool:
    return (start < 0 or pos >= start) and (end < 0 or pos < end)

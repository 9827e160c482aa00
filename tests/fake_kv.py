"""A fake backend for the engine (no model): `FakeKV` (KV memory), `FakeBackend`
(KV memory and runner) and `FakeModel` (a 65-token vocabulary).

`FakeKV` stands in for `kvchat.llama.Context`'s KV memory (`kvchat.engine.backend.KVMemory`).

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
import time
from functools import lru_cache

import numpy as np

from kvchat.errors import BackendError, DecodeError
from kvchat.llama import Batch, SamplerChain


class FakeKV:
    """KV memory of a fake context: `n_ctx` cells and `n_seq_max` sequence ids."""

    def __init__(self, *, n_ctx: int = 256, n_seq_max: int = 8, can_shift: bool = True,
                 partial_remove: bool = True) -> None:
        self.n_ctx = n_ctx
        self.n_ctx_seq = n_ctx  # one unified pool of cells
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


# -- the runner and the model -------------------------------------------------------------------

ALPHABET = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 ."
"""The text of tokens 1..64; token 0 is the end of generation."""
EOS = 0
N_VOCAB = 1 + len(ALPHABET)


@lru_cache(maxsize=None)
def fake_logits(previous: int, token: int) -> np.ndarray:
    """The logits after `token` at a position whose predecessor holds `previous`
    (-1 at position 0): fixed pseudo-random values, peaked enough that a few tokens
    take most of the probability at temperature 1, the end token less likely."""
    values = 3 * np.random.default_rng(previous * 7919 + token + 7919).standard_normal(N_VOCAB).astype(np.float32)
    values[EOS] -= 4.5
    values.flags.writeable = False
    return values


def reference_greedy(prompt: list[int] | tuple[int, ...], max_new: int, stop: frozenset[int] = frozenset()) -> list[int]:
    """What greedy decoding on the fake backend generates for `prompt`, computed
    without any KV: the tokens up to (not including) the end token or a stop token."""
    tokens = list(prompt)
    out: list[int] = []
    while len(out) < max_new:
        previous = tokens[-2] if len(tokens) > 1 else -1
        token = int(np.argmax(fake_logits(previous, tokens[-1])))
        if token == EOS or token in stop:
            break
        out.append(token)
        tokens.append(token)
    return out


class FakeBackend(FakeKV):
    """KV memory and runner of a fake context (`kvchat.engine.backend.Runner`).

    `decode` refuses what llama.cpp refuses, with its return codes and nothing
    evaluated: a sequence id or token outside range, positions of a sequence that
    do not continue its cells (Y = X + 1), and no free cells (1). Each evaluated
    token becomes one cell; a row's logits depend on its token and on the token
    its sequence holds at the position before (`fake_logits`), so evaluating
    onto wrong or missing cells changes what is sampled. `fail_next_decode` makes
    the next decode fail with that code; `decode_seconds` makes each decode take
    that long (a request that must still be running when the test acts).
    """

    def __init__(self, *, n_ctx: int = 256, n_seq_max: int = 8, n_batch: int = 64, can_shift: bool = True,
                 partial_remove: bool = True) -> None:
        super().__init__(n_ctx=n_ctx, n_seq_max=n_seq_max, can_shift=can_shift, partial_remove=partial_remove)
        self.n_batch = n_batch
        self.n_vocab = N_VOCAB
        self.fail_next_decode: int | None = None
        self.decode_seconds = 0.0
        self.decodes = 0
        self.rows_decoded = 0
        self._logits: dict[int, np.ndarray] = {}

    def decode(self, batch: Batch) -> None:
        rows = batch.rows()
        if not rows:
            return
        self._logits = {}
        if self.decode_seconds:
            time.sleep(self.decode_seconds)
        if self.fail_next_decode is not None:
            code, self.fail_next_decode = self.fail_next_decode, None
            raise DecodeError(code)
        next_position: dict[int, int] = {}
        for token, position, seq_id, _ in rows:
            if not (0 <= seq_id < self.n_seq_max and 0 <= token < self.n_vocab):
                raise DecodeError(-1)
            expected = next_position.get(seq_id, self.seq_pos_max(seq_id) + 1)
            if position != expected:
                raise DecodeError(-1)
            next_position[seq_id] = position + 1
        if self.cells_used() + len(rows) > self.n_ctx:
            raise DecodeError(1)
        for token, position, seq_id, _ in rows:
            self.append(seq_id, position, [token])
        for row, (token, position, seq_id, wants) in enumerate(rows):
            if wants:
                held = self._seqs[seq_id]
                previous = self._cells[held[position - 1]] if position - 1 in held else -1
                self._logits[row] = fake_logits(previous, token)
        self.decodes += 1
        self.rows_decoded += len(rows)

    def logits(self, row: int) -> np.ndarray:
        if row not in self._logits:
            raise BackendError(f"no logits for batch row {row}")
        return self._logits[row]

    def sample(self, sampler: SamplerChain, row: int) -> int:
        token = sampler.choose(np.array(self.logits(row)))
        sampler.accept(token)
        return token


class FakeModel:
    """The vocabulary side of a model, for an engine on `FakeBackend`."""

    n_vocab = N_VOCAB
    n_ctx_train = 0
    eos_token = EOS
    description = "fake model"
    is_recurrent = False
    is_hybrid = False

    def is_end_of_generation(self, token: int) -> bool:
        return token == EOS

    def is_control(self, token: int) -> bool:
        return token == EOS

    def token_to_bytes(self, token: int, *, special: bool = False) -> bytes:
        return b"" if token == EOS else ALPHABET[token - 1].encode()

    def tokenize(self, text: str, *, add_special: bool = True, parse_special: bool = False) -> list[int]:
        return [ALPHABET.index(c) + 1 for c in text if c in ALPHABET]

    def close(self) -> None:
        pass

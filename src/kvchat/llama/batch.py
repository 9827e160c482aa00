"""`Batch`: the token batch handed to one `llama_decode` call."""

from __future__ import annotations

from collections.abc import Sequence
from types import TracebackType

import llama_cpp
import numpy as np


class Batch:
    """A reusable `llama_batch` of up to `capacity` tokens, one sequence id per token.

    Fill it with :meth:`add` / :meth:`add_chunk`, hand it to `Context.decode`, then
    :meth:`clear` it for the next step. Free it with :meth:`close` (or `with`).
    """

    def __init__(self, capacity: int) -> None:
        if capacity <= 0:
            raise ValueError("batch capacity must be positive")
        self.capacity = capacity
        self._batch = llama_cpp.llama_batch_init(capacity, 0, 1)
        self._closed = False
        # numpy views over the C arrays make bulk writes of prompt chunks cheap.
        self._tokens = np.ctypeslib.as_array(self._batch.token, shape=(capacity,))
        self._positions = np.ctypeslib.as_array(self._batch.pos, shape=(capacity,))
        self._n_seq_id = np.ctypeslib.as_array(self._batch.n_seq_id, shape=(capacity,))
        self._wants_logits = np.ctypeslib.as_array(self._batch.logits, shape=(capacity,))
        self._seq_id = self._batch.seq_id
        self.n_tokens = 0

    def clear(self) -> None:
        """Empty the batch (keeps its memory)."""
        self.n_tokens = 0

    def add(self, token: int, position: int, seq_id: int, *, logits: bool) -> int:
        """Append one token; returns its row index in the batch."""
        i = self.n_tokens
        if i >= self.capacity:
            raise OverflowError("batch is full")
        self._tokens[i] = token
        self._positions[i] = position
        self._n_seq_id[i] = 1
        self._seq_id[i][0] = seq_id
        self._wants_logits[i] = logits
        self.n_tokens = i + 1
        return i

    def add_chunk(
        self,
        tokens: Sequence[int],
        first_position: int,
        seq_id: int,
        *,
        logits_last: bool = False,
        logits_from: int | None = None,
    ) -> int:
        """Append consecutive tokens of one sequence; returns the row of the last one.

        Logits are computed for the last token if `logits_last`, and for every token
        from index `logits_from` on (a speculative draft is verified at each of its
        positions).
        """
        n = len(tokens)
        start = self.n_tokens
        end = start + n
        if n == 0 or end > self.capacity:
            raise OverflowError("chunk is empty or does not fit in the batch")
        self._tokens[start:end] = tokens
        self._positions[start:end] = np.arange(first_position, first_position + n, dtype=self._positions.dtype)
        self._n_seq_id[start:end] = 1
        self._wants_logits[start:end] = False
        if logits_from is not None:
            self._wants_logits[start + max(0, logits_from) : end] = True
        if logits_last:
            self._wants_logits[end - 1] = True
        seq_ids = self._seq_id
        for i in range(start, end):
            seq_ids[i][0] = seq_id
        self.n_tokens = end
        return end - 1

    def rows(self) -> list[tuple[int, int, int, bool]]:
        """The batch's rows as (token, position, seq_id, wants_logits), in order."""
        return [
            (int(self._tokens[i]), int(self._positions[i]), int(self._seq_id[i][0]), bool(self._wants_logits[i]))
            for i in range(self.n_tokens)
        ]

    @property
    def raw(self) -> llama_cpp.llama_batch:
        """The `llama_batch` struct with `n_tokens` set, for `Context.decode`."""
        if self._closed:
            raise RuntimeError("batch is closed")
        self._batch.n_tokens = self.n_tokens
        return self._batch

    def close(self) -> None:
        """Free the C arrays. Safe to call twice."""
        if not self._closed:
            self._closed = True
            llama_cpp.llama_batch_free(self._batch)

    def __enter__(self) -> Batch:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

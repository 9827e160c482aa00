"""The engine's seam to the model runtime: KV memory and a runner.

The engine never calls llama.cpp directly. It holds the KV cells of its
sequences through a :class:`KVMemory` (only :class:`~kvchat.engine.kv_pool.KVPool`
calls it) and evaluates batches through a :class:`Runner`.
:class:`kvchat.llama.Context` implements both, and is what :class:`Engine`
creates unless it is handed others (the tests' fake backend, for one).
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from kvchat.llama import Batch, SamplerChain


class KVMemory(Protocol):
    """The KV cells of one context: `n_ctx` cells in one pool shared by
    `n_seq_max` sequence ids (a unified cache), at most `n_ctx_seq` per sequence.

    A cell holds one token at one position and may belong to several sequences:
    :meth:`seq_copy` shares cells, it does not copy them.
    """

    n_ctx: int
    n_ctx_seq: int
    n_seq_max: int

    @property
    def can_shift(self) -> bool:
        """Whether positions can be moved (:meth:`seq_shift`)."""
        ...

    def seq_copy(self, src: int, dst: int, start: int = -1, end: int = -1) -> None:
        """Share `src`'s cells at positions [start, end) with `dst` (-1: open end)."""
        ...

    def seq_remove(self, seq_id: int, start: int = -1, end: int = -1) -> bool:
        """Drop `seq_id`'s cells at [start, end); False if the memory cannot cut
        there (recurrent state can only be dropped whole)."""
        ...

    def seq_shift(self, seq_id: int, start: int, end: int, delta: int) -> None:
        """Add `delta` to the positions of `seq_id`'s cells in [start, end)."""
        ...

    def seq_pos_max(self, seq_id: int) -> int:
        """The highest position `seq_id` holds (-1: none)."""
        ...

    def seq_state(self, seq_id: int) -> bytes:
        """One sequence's state as bytes (to spill or save)."""
        ...

    def set_seq_state(self, seq_id: int, state: bytes) -> None:
        """Load bytes from :meth:`seq_state` into `seq_id`; `BackendError` if refused."""
        ...

    def layout_key(self) -> str:
        """What state bytes depend on: state saved under one key loads only where it is equal."""
        ...


class Runner(Protocol):
    """Evaluates batches of up to `n_batch` tokens and gives their rows' logits."""

    n_batch: int

    def decode(self, batch: Batch) -> None:
        """Evaluate `batch`: each token's cell joins its sequence. `DecodeError`
        (with llama.cpp's code) if it cannot, with nothing evaluated."""
        ...

    def logits(self, row: int) -> np.ndarray:
        """Batch row `row`'s logits from the last decode (valid until the next one)."""
        ...

    def sample(self, sampler: SamplerChain, row: int) -> int:
        """Let `sampler` pick a token from row `row`'s logits (and record the pick)."""
        ...

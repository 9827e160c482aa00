"""`Context`: one llama.cpp inference context with a unified KV cache."""

from __future__ import annotations

import ctypes
import json
import os
from dataclasses import dataclass
from importlib.metadata import version
from types import TracebackType
from typing import Protocol

import llama_cpp
import numpy as np

from kvchat.errors import BackendError, DecodeError
from kvchat.llama.batch import Batch
from kvchat.llama.model import Model


class RowSampler(Protocol):
    """What picks a token from a batch row (:class:`~kvchat.llama.SamplerChain`)."""

    def sample(self, context: Context, row: int) -> int: ...


_POOLING_TYPES: dict[str, int] = {
    "none": llama_cpp.LLAMA_POOLING_TYPE_NONE,
    "mean": llama_cpp.LLAMA_POOLING_TYPE_MEAN,
    "cls": llama_cpp.LLAMA_POOLING_TYPE_CLS,
    "last": llama_cpp.LLAMA_POOLING_TYPE_LAST,
    "rank": llama_cpp.LLAMA_POOLING_TYPE_RANK,
}


@dataclass(frozen=True, kw_only=True)
class ContextParams:
    """Settings of one llama.cpp context.

    `n_ctx` is one pool of KV cells shared by all `n_seq_max` sequences (the cache
    is unified), so a single sequence may use all of it.
    """

    n_ctx: int = 8192
    n_batch: int = 512
    n_ubatch: int = 512
    n_seq_max: int = 32
    n_threads: int | None = None
    swa_full: bool = True
    embeddings: bool = False
    pooling: str | None = None
    """How `embeddings` pools a sequence's token vectors: "none", "mean", "cls",
    "last" or "rank"; None lets llama.cpp choose (the model's own default)."""

    def resolved_threads(self) -> int:
        """`n_threads`, or every core the process may use."""
        if self.n_threads:
            return self.n_threads
        try:
            return max(1, len(os.sched_getaffinity(0)))
        except AttributeError:  # not on Linux
            return max(1, os.cpu_count() or 1)


class Context:
    """A llama.cpp context on a :class:`Model`: decodes batches and owns the KV cache.

    Not thread-safe: one thread (the engine's worker) must own it.
    """

    def __init__(self, model: Model, params: ContextParams = ContextParams()) -> None:
        self.model = model
        self.params = params
        raw = llama_cpp.llama_context_default_params()
        raw.n_ctx = params.n_ctx
        raw.n_batch = params.n_batch
        raw.n_ubatch = min(params.n_ubatch, params.n_batch)
        raw.n_seq_max = params.n_seq_max
        raw.n_threads = raw.n_threads_batch = params.resolved_threads()
        raw.swa_full = params.swa_full
        raw.kv_unified = True
        raw.embeddings = params.embeddings
        if params.pooling is not None:
            if params.pooling not in _POOLING_TYPES:
                raise ValueError(f"unknown pooling {params.pooling!r}; expected one of {sorted(_POOLING_TYPES)}")
            raw.pooling_type = _POOLING_TYPES[params.pooling]
            if params.embeddings and params.pooling != "none" and raw.n_ubatch % params.n_seq_max:
                # llama.cpp aborts the process (GGML_ASSERT in build_pooling while
                # reserving the graph) when the micro-batch does not split evenly.
                raise ValueError(
                    f"pooled embeddings need n_ubatch ({raw.n_ubatch}) to be a multiple of "
                    f"n_seq_max ({params.n_seq_max})"
                )
        raw.no_perf = True
        handle = llama_cpp.llama_init_from_model(model.handle, raw)
        if not handle:
            raise BackendError(f"llama.cpp could not create a context with {params}")
        self._handle = handle
        self._memory = llama_cpp.llama_get_memory(handle)
        self.n_ctx: int = llama_cpp.llama_n_ctx(handle)
        self.n_ctx_seq: int = llama_cpp.llama_n_ctx_seq(handle)
        self.n_batch: int = llama_cpp.llama_n_batch(handle)
        self.n_seq_max: int = llama_cpp.llama_n_seq_max(handle)
        self.n_vocab: int = model.n_vocab

    def layout_key(self) -> str:
        """What a saved sequence state depends on: the model file and the KV layout.

        State bytes saved under one key can be restored only where the key is equal.
        """
        return json.dumps(
            {
                "model_sha256": self.model.sha256(),
                "kv_type": "f16",
                "kv_unified": True,
                "swa_full": self.params.swa_full,
                "backend": f"llama-cpp-python=={version('llama-cpp-python')}",
            },
            sort_keys=True,
        )

    # -- lifetime ---------------------------------------------------------------

    def close(self) -> None:
        """Free the context and its KV cache. Safe to call twice."""
        if getattr(self, "_handle", None):
            llama_cpp.llama_free(self._handle)
            self._handle = None
            self._memory = None

    def __enter__(self) -> Context:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    @property
    def handle(self) -> llama_cpp.llama_context_p:
        """The raw `llama_context *`, for the other wrappers in this package only."""
        if not self._handle:
            raise BackendError("context is closed")
        return self._handle

    # -- decoding -----------------------------------------------------------------

    def decode(self, batch: Batch) -> None:
        """Evaluate a batch. Raises :class:`DecodeError` with llama.cpp's return code."""
        if batch.n_tokens == 0:
            return
        code = llama_cpp.llama_decode(self.handle, batch.raw)
        if code != 0:
            raise DecodeError(code)

    def logits(self, row: int) -> np.ndarray:
        """The logits of batch row `row` from the last decode, as a float32 view (no copy).

        The view is valid only until the next decode.
        """
        pointer = llama_cpp.llama_get_logits_ith(self.handle, row)
        if not pointer:
            raise BackendError(f"no logits for batch row {row}")
        return np.ctypeslib.as_array(pointer, shape=(self.n_vocab,))

    def sample(self, sampler: RowSampler, row: int) -> int:
        """Let `sampler` pick a token from batch row `row` of the last decode (and record it)."""
        return sampler.sample(self, row)

    def sequence_embedding(self, seq_id: int) -> np.ndarray:
        """The pooled embedding of `seq_id` from the last decode: a float32 copy of
        `n_embd` values.

        Needs a context made with ``embeddings=True`` and a pooling other than
        "none"; raises :class:`BackendError` when llama.cpp has no vector for it.
        """
        pointer = llama_cpp.llama_get_embeddings_seq(self.handle, seq_id)
        if not pointer:
            raise BackendError(f"no pooled embedding for sequence {seq_id}")
        return np.ctypeslib.as_array(pointer, shape=(self.model.n_embd,)).astype(np.float32, copy=True)

    # -- KV memory ----------------------------------------------------------------

    def seq_remove(self, seq_id: int, start: int = -1, end: int = -1) -> bool:
        """Drop the cells of `seq_id` at positions [start, end) (-1: open end).

        Returns False when a partial removal is impossible (recurrent models).
        """
        return bool(llama_cpp.llama_memory_seq_rm(self._memory, seq_id, start, end))

    def seq_copy(self, src: int, dst: int, start: int = -1, end: int = -1) -> None:
        """Share the cells of `src` at [start, end) with `dst` (no copy in a unified cache)."""
        llama_cpp.llama_memory_seq_cp(self._memory, src, dst, start, end)

    def seq_shift(self, seq_id: int, start: int, end: int, delta: int) -> None:
        """Add `delta` to the positions of `seq_id`'s cells in [start, end)."""
        llama_cpp.llama_memory_seq_add(self._memory, seq_id, start, end, delta)

    def seq_pos_max(self, seq_id: int) -> int:
        """The highest position `seq_id` holds a cell for (-1: none). Used to check that
        restored state bytes hold the positions their file says they do."""
        return int(llama_cpp.llama_memory_seq_pos_max(self._memory, seq_id))

    def clear_memory(self) -> None:
        """Drop every cell of every sequence."""
        llama_cpp.llama_memory_clear(self._memory, True)

    @property
    def can_shift(self) -> bool:
        """Whether positions can be shifted (needed to drop tokens from the middle)."""
        return bool(llama_cpp.llama_memory_can_shift(self._memory))

    # -- per-sequence state ---------------------------------------------------------

    def seq_state(self, seq_id: int) -> bytes:
        """The KV state of one sequence as bytes (for spilling or saving)."""
        size = llama_cpp.llama_state_seq_get_size(self.handle, seq_id)
        buffer = (ctypes.c_uint8 * size)()
        written = llama_cpp.llama_state_seq_get_data(self.handle, buffer, size, seq_id)
        if written != size:
            raise BackendError(f"sequence state copy wrote {written} of {size} bytes")
        return bytes(buffer)

    def set_seq_state(self, seq_id: int, state: bytes) -> None:
        """Restore bytes from :meth:`seq_state` into `seq_id` (its cells are replaced)."""
        buffer = (ctypes.c_uint8 * len(state)).from_buffer_copy(state)
        if llama_cpp.llama_state_seq_set_data(self.handle, buffer, len(state), seq_id) == 0:
            raise BackendError(f"llama.cpp refused a sequence state of {len(state)} bytes")

"""`Embedder`: text embeddings (mean-pooled, L2-normalized) from a loaded model.

An embedder owns a small llama context of its own, made with ``embeddings=True``
and mean pooling, on a :class:`~kvchat.llama.Model` whose weights it shares with
any engine on the same model. It never touches an engine's context or KV cache,
so embedding runs beside generation without going through the engine's worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Sequence
from types import TracebackType
from typing import Any

import numpy as np

from kvchat.errors import ContextOverflowError, InvalidRequestError
from kvchat.llama import Batch, Context, ContextParams, Model

logger = logging.getLogger(__name__)

__all__ = ["Embedder"]


def settle_from_thread(loop: asyncio.AbstractEventLoop, future: asyncio.Future[Any], outcome: object) -> None:
    """From a thread other than `loop`'s, give `future` its result, or its exception
    if `outcome` is one; nothing if the future is done already (its awaiter was
    cancelled) or the loop is closed (nobody waits)."""

    def settle() -> None:
        if future.done():
            return
        if isinstance(outcome, BaseException):
            future.set_exception(outcome)
        else:
            future.set_result(outcome)

    with contextlib.suppress(RuntimeError):
        loop.call_soon_threadsafe(settle)


class Embedder:
    """Embeds texts with `model`: one float32 vector of `n_embd` values per text.

    Each text is tokenized with the model's special tokens (BOS where the model
    adds one), evaluated with the model's own (causal) attention, and its token
    vectors are averaged (mean pooling) and scaled to unit L2 norm, so the dot
    product of two rows is their cosine similarity.

    Batching: by default each text is evaluated in a decode of its own (the
    KV memory is cleared after every decode), so a text's vector is a function
    of the text alone: the same text gives the bit-identical vector whichever
    texts share the call. With ``pack_texts=True`` several texts go into one
    decode (one sequence id each, at most `n_seq_max` texts and `n_batch`
    tokens). Their attention is masked from each other, but llama.cpp's CPU
    matrix kernels round differently depending on where a row falls in the
    batch and on the batch size, so a packed text's vector differs from its
    one-at-a-time vector slightly (cosine above 0.999; figures in
    docs/benchmarks.md, "Embeddings next to chat in one process") - fine for
    search, not reproducible bit for bit, and faster for many short texts.

    Decisions:

    - an empty string is embedded as the model's special tokens alone (BOS for
      most models); if the model adds no special tokens and a text has no
      tokens, :class:`InvalidRequestError` is raised;
    - a text of more tokens than :attr:`max_tokens` (the smaller of `n_ctx` and
      `n_batch`: pooling needs the whole text in one decode) raises
      :class:`ContextOverflowError`; nothing is truncated silently;
    - an empty list gives an array of shape ``(0, n_embd)``.

    Options: `n_ctx` (KV cells of the embedding context), `n_batch` (tokens per
    decode; also the longest text), `n_seq_max` (texts per decode when packing;
    `n_batch` must be a multiple of it), `n_threads` (None: every usable core),
    `pack_texts` (see above).

    Thread-safe: calls are serialized by a lock (the context is this object's
    alone). The model must outlive the embedder; :meth:`close` frees the context
    (not the model). Usable as a context manager.

    Next to an `Engine` in the same process, call it from a thread that ends
    when the work is done (as `kvchat serve` does): a thread that has run a
    decode keeps an OpenMP team while it lives, and while two such teams exist
    llama.cpp's CPU backend synchronises its threads more slowly, and the
    engine's decode runs slower for as long as the embedding thread lives
    (docs/benchmarks.md, "Embeddings next to chat in one process").
    :meth:`embed_async` does this.
    """

    def __init__(
        self,
        model: Model,
        *,
        n_ctx: int = 2048,
        n_batch: int = 2048,
        n_seq_max: int = 16,
        n_threads: int | None = None,
        pack_texts: bool = False,
    ) -> None:
        if n_ctx <= 0 or n_batch <= 0 or n_seq_max <= 0:
            raise ValueError("n_ctx, n_batch and n_seq_max must be positive")
        if pack_texts and min(n_batch, n_ctx) % n_seq_max:
            # llama.cpp aborts the process on such a pooled context; fail politely instead.
            raise ValueError(
                f"with pack_texts, n_batch ({min(n_batch, n_ctx)}) must be a multiple of n_seq_max ({n_seq_max})"
            )
        self.model = model
        self.n_embd: int = model.n_embd
        n_batch = min(n_batch, n_ctx)
        self._context = Context(
            model,
            ContextParams(
                n_ctx=n_ctx,
                n_batch=n_batch,
                n_ubatch=n_batch,
                n_seq_max=n_seq_max if pack_texts else 1,
                embeddings=True,
                pooling="mean",
                n_threads=n_threads,
            ),
        )
        try:
            self._batch = Batch(self._context.n_batch)
        except BaseException:
            self._context.close()
            raise
        self.max_tokens: int = min(
            self._context.n_ctx_seq, self._context.n_batch, model.n_ctx_train or self._context.n_ctx_seq
        )
        """Most tokens (special tokens included) that one text may have."""
        self._n_seq_max = self._context.n_seq_max if pack_texts else 1
        self.pack_texts = pack_texts
        self._lock = threading.Lock()
        self._closed = False

    # -- lifetime ---------------------------------------------------------------

    def close(self) -> None:
        """Free the embedding context (the model stays open). Safe to call twice."""
        with self._lock:
            if not self._closed:
                self._closed = True
                self._batch.close()
                self._context.close()

    def __enter__(self) -> Embedder:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # -- embedding ------------------------------------------------------------------

    def tokenize(self, text: str) -> list[int]:
        """The token ids :meth:`embed` evaluates for `text` (checked against the limits)."""
        tokens = self.model.tokenize(text, add_special=True)
        if not tokens:
            raise InvalidRequestError("cannot embed a text with no tokens", field="input")
        if len(tokens) > self.max_tokens:
            raise ContextOverflowError(prompt_tokens=len(tokens), max_tokens=0, context_limit=self.max_tokens)
        return tokens

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """Embed `texts`: a float32 array of shape ``(len(texts), n_embd)``, rows of unit norm.

        Every text is tokenized and checked before any is evaluated, so an
        oversized text fails the call without work done.
        """
        if isinstance(texts, str):
            raise TypeError("embed() takes a sequence of texts, not one string")
        return self.embed_tokens([self.tokenize(text) for text in texts])

    async def embed_async(self, texts: Sequence[str]) -> np.ndarray:
        """:meth:`embed` on a thread of its own that ends with the call (see the
        class's note on threads), awaited without blocking the event loop."""
        if isinstance(texts, str):
            raise TypeError("embed_async() takes a sequence of texts, not one string")
        texts = list(texts)
        loop = asyncio.get_running_loop()
        done: asyncio.Future[np.ndarray] = loop.create_future()

        def run() -> None:
            try:
                outcome: np.ndarray | BaseException = self.embed(texts)
            except BaseException as exc:  # noqa: BLE001 - handed to the awaiting caller
                outcome = exc
            settle_from_thread(loop, done, outcome)

        threading.Thread(target=run, name="kvchat-embed", daemon=True).start()
        return await done

    def embed_tokens(self, token_lists: Sequence[list[int]]) -> np.ndarray:
        """Embed texts already tokenized by :meth:`tokenize` (one row per token list)."""
        token_lists = list(token_lists)
        result = np.zeros((len(token_lists), self.n_embd), dtype=np.float32)
        with self._lock:
            if self._closed:
                raise RuntimeError("embedder is closed")
            for group in self._groups(token_lists):
                self._embed_group(group, token_lists, result)
        return result

    def _groups(self, token_lists: list[list[int]]) -> list[list[int]]:
        """Indices of the texts, in order, one decode per group (one text per group
        unless `pack_texts`)."""
        groups: list[list[int]] = []
        current: list[int] = []
        used = 0
        for i, tokens in enumerate(token_lists):
            if current and (used + len(tokens) > self._batch.capacity or len(current) >= self._n_seq_max):
                groups.append(current)
                current, used = [], 0
            current.append(i)
            used += len(tokens)
        if current:
            groups.append(current)
        return groups

    def _embed_group(self, group: list[int], token_lists: list[list[int]], out: np.ndarray) -> None:
        batch = self._batch
        batch.clear()
        for seq_id, i in enumerate(group):
            batch.add_chunk(token_lists[i], 0, seq_id, logits_last=True)
        try:
            self._context.decode(batch)
            for seq_id, i in enumerate(group):
                vector = self._context.sequence_embedding(seq_id)
                norm = float(np.linalg.norm(vector))
                out[i] = vector / norm if norm > 0 else vector
        finally:
            self._context.clear_memory()

"""`EmbeddingWorker`: the one thread that runs ``/v1/embeddings`` work.

Decision: embeddings get a dedicated worker thread rather than the event loop's
default thread pool (which chat requests use to render their prompts: a few
long embedding requests would hold every thread of it) and rather than the
engine's own worker thread (a long text is one decode of up to `n_batch` tokens;
run between the engine's steps, it would stall every streaming reply for that
long). The worker owns the :class:`~kvchat.engine.embedder.Embedder` (its own
llama context on the served model's weights, made at the first job) and runs
jobs one at a time in arrival order. How many jobs there are is bounded by the
server's admission: a job holds its request's slot and running place, counted
with the chat and completion requests of the same API key.

The thread ends when no job waits, and the next job starts a new one. A
thread that has run `llama_decode` keeps an OpenMP team for as long as it
lives, and while two such teams exist in the process (this one and the
engine's), libgomp throttles the spinning of ggml's barriers: the engine's
decode ran markedly slower from the first embedding request on, and recovered
once the thread ended (figures: docs/benchmarks.md, "Embeddings next to chat in
one process").

A job is cut per text: the worker tokenizes the texts one by one, checks the
request's token bound before any is evaluated, then evaluates them one by one,
and between two texts it looks whether the job was cancelled (time limit,
client disconnect, shutdown), so a cancel takes effect within one text.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from kvchat.engine.embedder import Embedder, settle_from_thread
from kvchat.errors import InvalidRequestError

log = logging.getLogger(__name__)

__all__ = ["EmbeddingJob", "EmbeddingWorker", "Embeddings"]


@dataclass(frozen=True)
class Embeddings:
    """A finished job: one unit-length float32 row per text, and the tokens evaluated."""

    vectors: np.ndarray
    prompt_tokens: int


class EmbeddingJob:
    """One request's texts on the worker. Await :meth:`result`; :meth:`cancel` stops
    the job before its next text."""

    def __init__(self, texts: Sequence[str], max_tokens: int, loop: asyncio.AbstractEventLoop) -> None:
        self.texts = list(texts)
        self.max_tokens = max_tokens
        self._loop = loop
        self._future: asyncio.Future[Embeddings | None] = loop.create_future()
        self._cancelled = threading.Event()

    def cancel(self) -> None:
        """Stop the job at the next text boundary (no effect once it has ended)."""
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    async def result(self) -> Embeddings | None:
        """The embeddings, or None if the job was cancelled; raises the job's typed error."""
        return await self._future

    def _resolve(self, value: Embeddings | BaseException | None) -> None:
        """Hand the outcome to the waiting coroutine (from the worker thread)."""
        settle_from_thread(self._loop, self._future, value)


class EmbeddingWorker:
    """Runs :class:`EmbeddingJob` objects one at a time on one thread.

    `make_embedder` is called on the worker thread at the first job. A thread
    starts with a job and ends when no job waits (see the module's note);
    :meth:`close` stops it and frees the embedder.
    """

    def __init__(self, make_embedder: Callable[[], Embedder]) -> None:
        self._make_embedder = make_embedder
        self._embedder: Embedder | None = None
        self._jobs: queue.SimpleQueue[EmbeddingJob | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._closed = False

    def submit(self, texts: Sequence[str], *, max_tokens: int) -> EmbeddingJob:
        """Queue `texts` (at most `max_tokens` tokens together); call from the event loop."""
        job = EmbeddingJob(texts, max_tokens, asyncio.get_running_loop())
        with self._lock:
            if self._closed:
                raise RuntimeError("the embedding worker is closed")
            self._jobs.put(job)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="kvchat-embeddings", daemon=True)
                self._thread.start()
        return job

    @property
    def running(self) -> bool:
        """Whether a worker thread is alive (it is only while jobs wait or run)."""
        with self._lock:
            return self._thread is not None

    def close(self) -> None:
        """Stop the thread after the job in hand (queued jobs end cancelled) and free the embedder."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            thread = self._thread
            self._jobs.put(None)
        if thread is not None:
            thread.join()
        if self._embedder is not None:
            self._embedder.close()
            self._embedder = None

    def _run(self) -> None:
        while True:
            with self._lock:  # taken and cleared together with `submit`'s put and start
                try:
                    job = self._jobs.get_nowait()
                except queue.Empty:
                    self._thread = None
                    return
            if job is None:
                break
            try:
                job._resolve(self._embed(job))
            except Exception as exc:  # noqa: BLE001 - the job's caller gets its error; the worker goes on
                job._resolve(exc)
        while True:  # closed: whatever still waits ends cancelled
            try:
                leftover = self._jobs.get_nowait()
            except queue.Empty:
                break
            if leftover is not None:
                leftover._resolve(None)

    def _embed(self, job: EmbeddingJob) -> Embeddings | None:
        if job.cancelled:
            return None
        if self._embedder is None:
            self._embedder = self._make_embedder()
        embedder = self._embedder
        token_lists: list[list[int]] = []
        total = 0
        for text in job.texts:
            if job.cancelled:
                return None
            token_lists.append(embedder.tokenize(text))
            total += len(token_lists[-1])
            if total > job.max_tokens:
                raise InvalidRequestError(
                    f"the inputs have more than {job.max_tokens} tokens; "
                    f"this server embeds at most {job.max_tokens} tokens per request",
                    field="input",
                )
        vectors = np.zeros((len(token_lists), embedder.n_embd), dtype=np.float32)
        for index, tokens in enumerate(token_lists):
            if job.cancelled:
                return None
            vectors[index] = embedder.embed_tokens([tokens])[0]
        return Embeddings(vectors, total)

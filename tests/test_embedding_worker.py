"""`EmbeddingWorker`'s thread: it runs jobs in order and ends when none waits.

The embedder is a stand-in (pure logic): these tests are about the worker's
thread, not about embeddings, which tests/test_embeddings.py covers.
"""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from kvchat.server.embedding_worker import EmbeddingWorker


class CountingEmbedder:
    """Embeds a text as its length; records the thread of each call."""

    n_embd = 2

    def __init__(self, release: threading.Event | None = None) -> None:
        self.threads: list[threading.Thread] = []
        self.release = release
        self.closed = False

    def tokenize(self, text: str) -> list[int]:
        return list(range(len(text) or 1))

    def embed_tokens(self, token_lists: list[list[int]]) -> np.ndarray:
        self.threads.append(threading.current_thread())
        if self.release is not None:
            self.release.wait(timeout=10)
        return np.array([[float(len(tokens)), 1.0] for tokens in token_lists], dtype=np.float32)

    def close(self) -> None:
        self.closed = True


def wait_until_idle(worker: EmbeddingWorker, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while worker.running and time.monotonic() < deadline:
        time.sleep(0.005)


def test_the_thread_ends_when_no_job_waits_and_the_next_job_starts_a_new_one() -> None:
    embedder = CountingEmbedder()
    worker = EmbeddingWorker(lambda: embedder)

    async def one(texts: list[str]) -> np.ndarray:
        result = await worker.submit(texts, max_tokens=100).result()
        assert result is not None
        return result.vectors

    first = asyncio.run(one(["abc"]))
    wait_until_idle(worker)
    assert not worker.running
    second = asyncio.run(one(["abcdef", "a"]))
    wait_until_idle(worker)
    assert not worker.running
    assert first[:, 0].tolist() == [3.0] and second[:, 0].tolist() == [6.0, 1.0]
    assert len(embedder.threads) == 3 and embedder.threads[0] is not embedder.threads[1]
    assert not any(thread.is_alive() for thread in embedder.threads)
    worker.close()
    assert embedder.closed


def test_jobs_queued_while_one_runs_share_its_thread_in_order() -> None:
    release = threading.Event()
    embedder = CountingEmbedder(release)
    worker = EmbeddingWorker(lambda: embedder)

    async def many() -> list[float]:
        jobs = [worker.submit(["x" * n], max_tokens=100) for n in (1, 2, 3, 4)]
        await asyncio.sleep(0.05)
        assert worker.running  # the first job holds the thread; the others wait
        release.set()
        results = [await job.result() for job in jobs]
        return [r.vectors[0, 0] for r in results if r is not None]

    assert asyncio.run(many()) == [1.0, 2.0, 3.0, 4.0]
    assert len({id(thread) for thread in embedder.threads}) == 1
    wait_until_idle(worker)
    assert not worker.running
    worker.close()


def test_a_failing_job_reports_its_error_and_the_worker_goes_on() -> None:
    worker = EmbeddingWorker(CountingEmbedder)

    async def run() -> None:
        from kvchat.errors import InvalidRequestError

        with pytest.raises(InvalidRequestError):
            await worker.submit(["x" * 50], max_tokens=10).result()
        result = await worker.submit(["ok"], max_tokens=10).result()
        assert result is not None and result.vectors[0, 0] == 2.0

    asyncio.run(run())
    worker.close()


def test_a_closed_worker_refuses_jobs() -> None:
    worker = EmbeddingWorker(CountingEmbedder)
    worker.close()

    async def submit() -> None:
        worker.submit(["x"], max_tokens=10)

    with pytest.raises(RuntimeError, match="closed"):
        asyncio.run(submit())

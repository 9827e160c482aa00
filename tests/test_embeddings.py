"""Text embeddings: `Embedder` on the real Gemma model, `KVTextEmbedding` on Qwen."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest

from kvchat.engine.embedder import Embedder
from kvchat.errors import ContextOverflowError
from kvchat.llama import Model

TEXTS = [
    "The cat sat on the mat.",
    "A cat was sitting on the rug.",
    "Stock markets fell sharply after the interest rate announcement.",
    "How do I bake bread at home?",
    "What is the recipe for making homemade bread?",
    "The quarterly earnings report exceeded analyst expectations.",
]


@pytest.fixture(scope="module")
def embedder(gemma_model: Model) -> Embedder:
    with Embedder(gemma_model, n_ctx=512, n_batch=512) as embedder:
        yield embedder


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_shape_dtype_and_unit_norm(embedder: Embedder, gemma_model: Model) -> None:
    vectors = embedder.embed(TEXTS)
    assert vectors.shape == (len(TEXTS), gemma_model.n_embd)
    assert vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)


def test_empty_list_gives_zero_rows(embedder: Embedder, gemma_model: Model) -> None:
    vectors = embedder.embed([])
    assert vectors.shape == (0, gemma_model.n_embd) and vectors.dtype == np.float32


def test_empty_string_is_embedded_as_special_tokens(embedder: Embedder) -> None:
    vector = embedder.embed([""])[0]
    assert np.all(np.isfinite(vector))
    assert abs(np.linalg.norm(vector) - 1.0) < 1e-5


def test_same_text_gives_identical_vectors(embedder: Embedder) -> None:
    vectors = embedder.embed([TEXTS[0], TEXTS[2], TEXTS[0]])
    assert np.array_equal(vectors[0], vectors[2])
    assert np.array_equal(vectors[0], embedder.embed([TEXTS[0]])[0])


@pytest.mark.parametrize(
    ("text", "paraphrase", "unrelated"),
    [
        (TEXTS[0], TEXTS[1], TEXTS[2]),
        (TEXTS[3], TEXTS[4], TEXTS[5]),
        (TEXTS[2], TEXTS[5], TEXTS[0]),
    ],
)
def test_paraphrase_is_closer_than_unrelated_text(
    embedder: Embedder, text: str, paraphrase: str, unrelated: str
) -> None:
    a, p, u = embedder.embed([text, paraphrase, unrelated])
    assert cosine(a, p) > cosine(a, u) + 0.1


def test_batch_equals_one_at_a_time(embedder: Embedder) -> None:
    batched = embedder.embed(TEXTS)
    single = np.stack([embedder.embed([text])[0] for text in TEXTS])
    np.testing.assert_array_equal(batched, single)  # one decode per text: exact


def test_packed_texts_agree_with_one_at_a_time(gemma_model: Model, embedder: Embedder) -> None:
    """Packing several texts per decode changes the CPU kernels' rounding, not the
    meaning. Measured on these texts: max 2.6e-3 per component, cosine >= 0.99994
    (on 64 short texts packed 16 per decode: 1.7e-2 and 0.9994)."""
    single = embedder.embed(TEXTS)
    with Embedder(gemma_model, n_ctx=512, n_batch=512, pack_texts=True) as packed_embedder:
        packed = packed_embedder.embed(TEXTS)
        assert np.array_equal(packed, packed_embedder.embed(TEXTS))  # deterministic for the same call
    np.testing.assert_allclose(np.linalg.norm(packed, axis=1), 1.0, atol=1e-5)
    assert np.min(np.sum(packed * single, axis=1)) > 0.9995
    assert np.abs(packed - single).max() < 0.01


def test_packing_respects_batch_and_sequence_limits(gemma_model: Model, embedder: Embedder) -> None:
    texts = [f"Sentence {i} about nothing in particular." for i in range(7)]
    with Embedder(gemma_model, n_ctx=64, n_batch=32, n_seq_max=4, pack_texts=True) as small:
        packed = small.embed(texts)
    assert packed.shape == (7, gemma_model.n_embd)
    assert np.min(np.sum(packed * embedder.embed(texts), axis=1)) > 0.9995  # measured 0.99996


def test_packing_needs_batch_divisible_by_sequences(gemma_model: Model) -> None:
    with pytest.raises(ValueError, match="multiple"):
        Embedder(gemma_model, n_ctx=64, n_batch=64, n_seq_max=3, pack_texts=True)


def test_too_long_text_raises_context_overflow(gemma_model: Model) -> None:
    with Embedder(gemma_model, n_ctx=64, n_batch=64) as small:
        with pytest.raises(ContextOverflowError) as info:
            small.embed(["short", "word " * 200])
        assert info.value.context_limit == small.max_tokens == 64
        assert small.embed(["still works"]).shape == (1, gemma_model.n_embd)


def test_threads_share_one_embedder(embedder: Embedder) -> None:
    expected = embedder.embed(TEXTS)
    results: dict[int, np.ndarray] = {}

    def run(i: int) -> None:
        results[i] = embedder.embed(TEXTS)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for vectors in results.values():
        assert np.array_equal(vectors, expected)


def embed_threads_alive() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "kvchat-embed" and t.is_alive()]


def wait_for_embed_threads_to_end(timeout: float = 5.0) -> list[threading.Thread]:
    for thread in embed_threads_alive():
        thread.join(timeout)
    return embed_threads_alive()


def test_embed_async_gives_the_vectors_of_embed_on_a_thread_that_ends(embedder: Embedder) -> None:
    expected = embedder.embed(TEXTS)

    async def both() -> tuple[np.ndarray, np.ndarray]:
        return await asyncio.gather(embedder.embed_async(TEXTS), embedder.embed_async(TEXTS[:2]))

    everything, first_two = asyncio.run(both())
    assert np.array_equal(everything, expected) and np.array_equal(first_two, expected[:2])
    assert wait_for_embed_threads_to_end() == []


def test_embed_async_raises_the_calls_error_and_refuses_one_string(gemma_model: Model) -> None:
    with Embedder(gemma_model, n_ctx=64, n_batch=64) as small:
        with pytest.raises(ContextOverflowError):
            asyncio.run(small.embed_async(["short", "word " * 200]))
        with pytest.raises(TypeError):
            asyncio.run(small.embed_async("one string"))
        assert asyncio.run(small.embed_async(["still works"])).shape == (1, gemma_model.n_embd)
    assert wait_for_embed_threads_to_end() == []


def test_close_is_idempotent_and_final(gemma_model: Model) -> None:
    embedder = Embedder(gemma_model, n_ctx=64, n_batch=64)
    embedder.close()
    embedder.close()
    with pytest.raises(RuntimeError):
        embedder.embed(["after close"])


def test_semantic_kernel_service(qwen_model: Model) -> None:
    from kvchat.integrations.semantic_kernel import KVTextEmbedding

    service = KVTextEmbedding(model=qwen_model, embedder_options={"n_ctx": 512, "n_batch": 512})
    try:
        vectors = asyncio.run(service.generate_embeddings(["hello world", "good morning", "the cat sat"]))
        assert isinstance(vectors, np.ndarray)
        assert vectors.shape == (3, qwen_model.n_embd) and vectors.dtype == np.float32
        np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
        assert service.ai_model_id == qwen_model.path.name
    finally:
        service.close()
    assert not qwen_model.closed  # a given model is left open


def test_semantic_kernel_service_needs_exactly_one_source(qwen_model: Model) -> None:
    from kvchat.integrations.semantic_kernel import KVTextEmbedding

    with pytest.raises(ValueError):
        KVTextEmbedding()

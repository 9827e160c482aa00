"""`Model`'s vocabulary calls from several threads at once (the engine thread, worker
threads and the event loop all tokenize and detokenize)."""

from __future__ import annotations

import threading

import pytest

from kvchat.llama import Model


def _run_together(work, n_threads: int) -> list[BaseException]:
    """Run `work(index)` in `n_threads` threads started together; the errors they raised."""
    start = threading.Barrier(n_threads)
    errors: list[BaseException] = []

    def run(index: int) -> None:
        start.wait()
        try:
            work(index)
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n_threads)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return errors


def test_detokenize_from_several_threads_gives_each_its_own_bytes(gemma_model: Model) -> None:
    # Each thread detokenizes its own token ids over and over; a buffer shared between
    # calls would hand one thread another thread's piece (ctypes releases the GIL).
    texts = [
        "The quick brown fox jumps over the lazy dog. " * 4,
        "Всё смешалось в доме Облонских. " * 4,
        "東京は日本の首都です。" * 4,
        "def main():\n    return [x ** 2 for x in range(10)]\n" * 4,
    ]
    token_lists = [gemma_model.tokenize(text) for text in texts]
    expected = [[gemma_model.token_to_bytes(t) for t in tokens] for tokens in token_lists]
    wrong: list[tuple[int, int]] = []

    def work(index: int) -> None:
        tokens, pieces = token_lists[index % 4], expected[index % 4]
        for _ in range(300):
            for k, token in enumerate(tokens):
                if gemma_model.token_to_bytes(token) != pieces[k]:
                    wrong.append((index, k))
            assert gemma_model.detokenize(tokens) == texts[index % 4]

    assert _run_together(work, 8) == [] and wrong == []


def test_tokenize_from_several_threads_gives_each_its_own_ids(gemma_model: Model) -> None:
    texts = [f"Thread {i} says: " + "word " * (20 + 7 * i) + "<start_of_turn>" for i in range(8)]
    expected = [gemma_model.tokenize(text, parse_special=bool(i % 2)) for i, text in enumerate(texts)]

    def work(index: int) -> None:
        for _ in range(300):
            assert gemma_model.tokenize(texts[index], parse_special=bool(index % 2)) == expected[index]

    assert _run_together(work, 8) == []


@pytest.mark.parametrize("token", [-1, "n_vocab", 2**31 - 1, 2**40])
def test_vocabulary_lookups_refuse_an_id_outside_the_vocabulary(gemma_model: Model, token) -> None:
    # llama.cpp aborts the process on such an id; the wrapper raises before calling it.
    token = gemma_model.n_vocab if token == "n_vocab" else token
    for lookup in (gemma_model.token_to_bytes, gemma_model.is_control, gemma_model.is_end_of_generation,
                   lambda t: gemma_model.detokenize([1, t])):
        with pytest.raises(ValueError, match="not in this model's vocabulary"):
            lookup(token)
    assert gemma_model.detokenize(gemma_model.tokenize("hello world")) == "hello world"  # ids in range still are

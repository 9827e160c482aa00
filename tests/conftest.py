"""Shared fixtures: each packaged model is loaded once per test run."""

from __future__ import annotations

import pytest

from kvchat import Engine, EngineSettings
from kvchat.llama import Model
from kvchat.models import resolve


@pytest.fixture(scope="session")
def gemma_model() -> Model:
    """Gemma 3 270M, the fast model for mechanics."""
    with Model(resolve("gemma-3-270m", progress=False)) as model:
        yield model


@pytest.fixture(scope="session")
def gemma_engine(gemma_model: Model) -> Engine:
    """One engine on Gemma, shared by the tests that leave it idle when done."""
    with Engine(gemma_model, EngineSettings(n_ctx=8192, max_running=16, n_seq_max=32)) as engine:
        yield engine


@pytest.fixture(scope="session")
def cold_engine(gemma_model: Model) -> Engine:
    """An engine on Gemma without a prefix cache: every prompt token is evaluated."""
    with Engine(gemma_model, EngineSettings(n_ctx=4096, max_running=16, n_seq_max=16, prefix_cache=False)) as engine:
        yield engine


@pytest.fixture
def idle_engine(gemma_engine: Engine) -> Engine:
    """The shared engine (prefix cache on), checked to be idle after the test."""
    yield gemma_engine
    assert_idle(gemma_engine)


@pytest.fixture
def idle_cold_engine(cold_engine: Engine) -> Engine:
    """The shared engine without prefix cache, checked to be idle after the test.

    For tests that compare two runs of the same prompt token for token: with the
    cache, the second run evaluates a different batch split, and llama.cpp's
    logits differ slightly between splits.
    """
    yield cold_engine
    assert_idle(cold_engine)


def assert_idle(engine: Engine) -> None:
    """No request running or queued, no sequence or KV cell leaked."""
    stats = wait_idle(engine)
    assert stats.active == 0 and stats.queued == 0
    assert stats.free_sequences + stats.parked_sequences == engine.settings.n_seq_max
    assert stats.tokens_resident == stats.cache_tokens  # nothing held outside the cache
    assert stats.locked_cache_tokens == 0  # no cache node still locked by a finished request


def wait_idle(engine: Engine, timeout: float = 10.0):
    """The engine's stats once it has nothing running (stats lag a step behind)."""
    import time

    deadline = time.monotonic() + timeout
    stats = engine.stats()
    while (stats.active or stats.queued) and time.monotonic() < deadline:
        time.sleep(0.02)
        stats = engine.stats()
    return stats


@pytest.fixture(scope="session")
def qwen_model() -> Model:
    """Qwen2.5-Coder 0.5B Instruct, the packaged chat model (it has a chat template)."""
    with Model(resolve("qwen2.5-coder-0.5b-instruct", progress=False)) as model:
        yield model


@pytest.fixture(scope="session")
def qwen_engine(qwen_model: Model) -> Engine:
    """One engine on Qwen, shared by the chat tests."""
    with Engine(qwen_model, EngineSettings(n_ctx=8192, max_running=8, n_seq_max=16)) as engine:
        yield engine

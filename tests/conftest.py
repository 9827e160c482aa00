"""Shared fixtures (each packaged model is loaded once per test run) and the test tiers.

Three tiers, chosen with `-m` (see the Makefile's test targets):

- unmarked: needs no model (`make test-fast`, seconds);
- `model`: loads a real model in this process;
- `system`: starts processes (`kvchat serve`, the CLI), soak, crash and restart.

A test that uses a model fixture (`MODEL_FIXTURES`, or any fixture built on
one) is marked `model` here; a test that loads a model any other way carries
the mark itself. Every test without the `model` or `system` mark runs with
model loading disabled, and one without `system` cannot start a Python or
`kvchat` process: a test that would load a model unmarked fails loudly (in
every tier) instead of slowing the fast tier down.

Helpers shared by the test modules are in helpers.py, not here.
"""

from __future__ import annotations

import faulthandler
import os
import subprocess
import sys
from collections.abc import Iterator

import llama_cpp
import llama_cpp.llama_cpp
import pytest
from helpers import assert_idle

from kvchat import Engine, EngineSettings
from kvchat.llama import Model
from kvchat.models import resolve

MODEL_FIXTURES = frozenset({"gemma_model", "qwen_model"})
"""Session fixtures that load a model; every test using one (even indirectly) is marked `model`."""


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by marker
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if MODEL_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.model)


_STDERR_FOR_CRASHES: int | None = None
"""A copy of the run's stderr, taken before any test: where a crash's traceback goes."""


def pytest_configure(config: pytest.Config) -> None:
    global _STDERR_FOR_CRASHES
    _STDERR_FOR_CRASHES = os.dup(sys.stderr.fileno())


def _restore_crash_tracebacks() -> None:
    """Point Python's fault handler (SIGABRT, SIGSEGV...) at the run's stderr again.

    `ray.init` installs Ray's own handlers for those signals, which write into Ray's
    log files; a crash in any later test would otherwise end the run with a bare
    "Aborted" and no traceback."""
    if _STDERR_FOR_CRASHES is not None:
        faulthandler.disable()
        faulthandler.enable(file=_STDERR_FOR_CRASHES, all_threads=True)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Iterator[None]:
    """Set-up, call and teardown of a test without the `model`/`system` marks run
    with model loading (and, without `system`, Python child processes) disabled."""
    _restore_crash_tracebacks()
    marks = {mark.name for mark in item.iter_markers()}
    with pytest.MonkeyPatch.context() as patch:
        if not marks & {"model", "system"}:
            load = llama_cpp.llama_model_load_from_file
            guarded = _no_model_load(item.nodeid, load)
            for module in (llama_cpp, llama_cpp.llama_cpp):
                patch.setattr(module, "llama_model_load_from_file", guarded)
        if "system" not in marks:
            patch.setattr(subprocess.Popen, "__init__", _no_python_process(item.nodeid, subprocess.Popen.__init__))
        return (yield)


def _no_model_load(nodeid: str, load):
    def guarded(path, params):
        handle = load(path, params)  # a file llama.cpp refuses still gets its own error
        if handle:
            llama_cpp.llama_model_free(handle)
            pytest.fail(f"{nodeid} loaded the model {os.fsdecode(path)} but is not marked `model` "
                        "(use a model fixture or @pytest.mark.model; see tests/conftest.py)", pytrace=False)
        return handle

    return guarded


def _no_python_process(nodeid: str, init):
    def guarded(self, args, *rest, **options):
        argv = [args] if isinstance(args, (str, bytes, os.PathLike)) else list(args)
        program = os.path.basename(os.fsdecode(argv[0])) if argv else ""
        if os.fsdecode(argv[0]) == sys.executable or program.startswith(("python", "kvchat")):
            pytest.fail(f"{nodeid} started {program} but is not marked `system` (see tests/conftest.py)",
                        pytrace=False)
        init(self, args, *rest, **options)

    return guarded


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
    """An engine on Gemma without a prefix cache or speculation: every prompt token is
    evaluated, and every step has the same shape however often a prompt has run
    (speculation drafts from what earlier requests taught the engine, so a second
    run's calls would have other shapes; the drafting tests have their own engines)."""
    settings = EngineSettings(n_ctx=4096, max_running=16, n_seq_max=16, prefix_cache=False, speculation="off")
    with Engine(gemma_model, settings) as engine:
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
    cache (or speculation's drafts), the second run evaluates a different batch
    split, and llama.cpp's logits differ slightly between splits.
    """
    yield cold_engine
    assert_idle(cold_engine)


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

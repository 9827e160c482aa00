"""`Engine`: the public API, checks on the caller's thread, and the worker thread that steps the core."""

from __future__ import annotations

import itertools
import logging
import os
import queue
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Generic, TypeVar, cast

from kvchat.engine.backend import KVMemory, Runner
from kvchat.engine.context_shift import ContextShift, shifted_namespace
from kvchat.engine.conversation import Conversation, read_conversation_file
from kvchat.engine.core import EngineCore
from kvchat.engine.drafting import index_request
from kvchat.engine.pinned import PinnedSequence
from kvchat.engine.pinning import PinnedSequences
from kvchat.engine.request import Request, RequestSpec
from kvchat.engine.sampling import SamplingParams
from kvchat.engine.settings import EngineSettings
from kvchat.engine.stats import EngineStats, StepTiming
from kvchat.engine.stream import Stream
from kvchat.errors import (
    BackendError,
    ContextOverflowError,
    ConversationFileError,
    EngineClosedError,
    InvalidRequestError,
    ModelLoadError,
)
from kvchat.llama import Context, Model

logger = logging.getLogger("kvchat.engine")

_WAKE = object()  # command: look at cancel flags
_CLOSE = object()  # command: stop the worker
T = TypeVar("T")


class _Call(Generic[T]):
    """Command: run a conversation operation on the worker thread and hand back its result."""

    result: T  # set by run() unless it sets `error`

    def __init__(self, function: Callable[[PinnedSequences], T]) -> None:
        self.function = function
        self.done = threading.Event()
        self.error: BaseException | None = None

    def run(self, pinned: PinnedSequences) -> None:
        try:
            self.result = self.function(pinned)
        except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread, which re-raises it
            self.error = exc
        finally:
            self.done.set()


class Engine:
    """Continuous-batching inference on one model.

    ``Engine(model, settings)`` runs on a loaded :class:`~kvchat.llama.Model`
    (left open on close) or on the path of a GGUF file, which it loads and frees
    (a packaged model's path comes from :func:`kvchat.models.resolve`), and starts
    a worker thread that owns the llama context. :meth:`submit` queues a request
    and returns a :class:`Stream`. Each step the worker decodes one token for
    every generating request plus prompt chunks of new ones, batched into as few
    ``llama_decode`` calls as the CPU attention kernels make worthwhile (see
    :class:`~kvchat.engine.step_planner.StepPlanner`); the step itself is
    :class:`~kvchat.engine.core.EngineCore`'s. Thread-safe; close it with
    :meth:`close` or use it as a context manager.

    `memory` and `runner` (given together) replace the llama.cpp context the engine
    would create (see :mod:`kvchat.engine.backend`); `model` then only needs to
    give the vocabulary, and the caller keeps both open.
    """

    def __init__(
        self,
        model: Model | str | os.PathLike[str],
        settings: EngineSettings | None = None,
        *,
        memory: KVMemory | None = None,
        runner: Runner | None = None,
    ) -> None:
        if (memory is None) != (runner is None):
            raise ValueError("pass both a KV memory and a runner, or neither")
        self.settings = settings or EngineSettings()
        self._owns_model = False
        if isinstance(model, Model) or memory is not None:
            self.model = cast(Model, model)  # with a backend given: its model (a test's fake has no file)
        else:
            self.model, self._owns_model = _load_model_file(model), True
        self._context: Context | None = None
        if memory is None or runner is None:
            try:
                self._context = memory = runner = Context(self.model, self.settings.context_params(self.model))
            except BaseException:
                self._close_owned_model()
                raise
        self._memory = memory
        self.context_limit: int = min(
            memory.n_ctx_seq,
            self.model.n_ctx_train or memory.n_ctx_seq,
            self.settings.max_request_tokens or memory.n_ctx_seq,
        )
        """Most tokens (prompt + generated) one request may hold."""
        try:
            self._core = EngineCore(self.model, self.settings, memory, runner)
        except BaseException:  # (a cache directory it cannot use, say): free what was made
            if self._context is not None:
                self._context.close()
            self._close_owned_model()
            raise
        self._commands: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._request_ids = itertools.count(1)
        self._closing = False
        self._submit_lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="kvchat-engine", daemon=True)
        self._thread.start()

    # -- public API ------------------------------------------------------------------

    def submit(
        self,
        prompt_tokens: Sequence[int],
        sampling: SamplingParams | None = None,
        *,
        cache_key: str | None = None,
        shift: ContextShift | None = None,
        pinned: PinnedSequence | None = None,
    ) -> Stream:
        """Queue a request for `prompt_tokens` and return its stream.

        The longest prefix of the prompt still held by the cache is reused and
        only the rest is evaluated. Requests with different `cache_key`s (tenants)
        never share cached cells. With `shift`, `prompt_tokens` must be
        ``shift.prompt``: its KV may then be built by shifting the cached KV of
        ``shift.original`` (models that cannot shift positions raise
        `InvalidRequestError`). With `pinned` (used by `Conversation`), the request
        runs in that pinned sequence: `prompt_tokens` must start with its resident
        tokens, and only the rest is evaluated.

        A `sampling.grammar` is compiled here, on the caller's thread. Should it fail
        while decoding, the stream ends with a `GrammarError`.

        Raises `InvalidRequestError` (empty prompt, token ids outside the vocabulary,
        bad sampling values, a grammar that does not compile or that no output
        satisfies), `ContextOverflowError` (prompt + max_tokens exceed
        :attr:`context_limit`) or `EngineClosedError`, before anything is queued.
        """
        sampling = sampling or SamplingParams()
        prompt = self.checked_prompt(prompt_tokens)
        sampling.check_token_ids(self.model.n_vocab)
        grammar = sampling.constraint
        # Compiled here, on the caller's thread: the worker only steps through it.
        matcher = grammar.matcher(self.model) if grammar is not None else None
        room = self.context_limit - len(prompt)
        max_new = sampling.max_tokens
        if max_new is None:
            max_new = min(room, self.settings.open_max_tokens or room)
        if max_new > room or room < 1:
            raise ContextOverflowError(
                prompt_tokens=len(prompt), max_tokens=max(max_new, 1), context_limit=self.context_limit
            )
        if pinned is not None and (
            pinned.closed or len(prompt) <= len(pinned.tokens) or list(prompt[: len(pinned.tokens)]) != pinned.tokens
        ):
            raise InvalidRequestError("the prompt must extend the pinned sequence's resident tokens", field="prompt")
        if shift is not None:
            self._check_shift(prompt, shift)
        request_id = next(self._request_ids)
        spec = RequestSpec(
            request_id,
            prompt,
            sampling,
            max_new,
            self.settings.reservation_step,
            cache_key=cache_key if shift is None else shifted_namespace(cache_key),
            shift=shift,
            original_cache_key=cache_key if shift is not None else None,
            pinned=pinned,
        )
        request = Request(spec, Stream(request_id, on_cancel=lambda: self._request_cancel(request)))
        request.grammar = matcher
        if self._core.speculator is not None:
            # Indexed here, on the caller's thread: a long prediction costs the worker nothing.
            request.draft_indexes = index_request(prompt, sampling.prediction)
        with self._submit_lock:
            if self._closing:
                raise EngineClosedError("the engine is closed")
            self._commands.put(request)
        return request.stream

    def generate(
        self,
        prompt: str,
        sampling: SamplingParams | None = None,
        *,
        parse_special: bool = False,
        cache_key: str | None = None,
    ) -> Stream:
        """Tokenize `prompt` (with the model's BOS; special-token text parsed only if
        `parse_special`) and :meth:`submit` it."""
        tokens = self.model.tokenize(prompt, add_special=True, parse_special=parse_special)
        return self.submit(tokens, sampling, cache_key=cache_key)

    def _on_worker(self, function: Callable[[PinnedSequences], T]) -> T:
        """Run a conversation operation on the worker thread, between two steps, and
        return its result (or raise its exception). For `Conversation` only."""
        if threading.current_thread() is self._thread:
            return function(self._core.pinned)
        call = _Call(function)
        with self._submit_lock:
            if self._closing:
                raise EngineClosedError("the engine is closed")
            self._commands.put(call)
        call.done.wait()
        if call.error is not None:
            raise call.error
        return call.result

    def conversation(self) -> Conversation:
        """A new, empty :class:`~kvchat.Conversation` on this engine."""
        return Conversation(self, self._on_worker(PinnedSequences.pin))

    def load_conversation(self, path: str | os.PathLike[str]) -> Conversation:
        """Restore a conversation written by `Conversation.save` (same model and KV
        layout only; `ConversationFileError` otherwise, for a damaged file, or for one whose
        state does not hold as many positions as its token list)."""
        layout = self._on_worker(PinnedSequences.layout_key)
        saved = read_conversation_file(Path(path), layout_key=layout)
        try:
            pinned = self._on_worker(lambda ops: ops.restore(saved.tokens, saved.state))
        except ConversationFileError as exc:  # its state does not hold its tokens
            raise ConversationFileError(f"{path} {exc}", field="path") from None
        return Conversation(self, pinned, saved.pending)

    def stats(self) -> EngineStats:
        """The latest snapshot of the engine's state and counters."""
        return self._core.stats.latest()

    def step_timings(self) -> list[StepTiming]:
        """The latest steps that ran the model (up to 4,096), oldest first: how long
        the worker held every running request at a time."""
        return self._core.stats.step_timings()

    @property
    def closed(self) -> bool:
        """True once :meth:`close` was called."""
        return self._closing

    def close(self) -> None:
        """Stop the worker: running and queued requests end with finish reason
        ``cancelled``; then free the context (and the model, if the engine loaded it)."""
        with self._submit_lock:
            if self._closing:
                already = True
            else:
                already = False
                self._closing = True
                self._commands.put(_CLOSE)
        if threading.current_thread() is not self._thread:
            self._thread.join()
        if not already:
            logger.debug("engine closed")

    def __enter__(self) -> Engine:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # -- checks on the caller's thread ---------------------------------------------------------

    def checked_prompt(self, prompt_tokens: Sequence[int]) -> tuple[int, ...]:
        """`prompt_tokens` as a tuple, or `InvalidRequestError` if it is empty or holds
        an id outside the model's vocabulary (what :meth:`submit` checks first)."""
        try:
            prompt = tuple(int(t) for t in prompt_tokens)
        except (TypeError, ValueError) as exc:
            raise InvalidRequestError("prompt must be a sequence of token ids", field="prompt") from exc
        if not prompt:
            raise InvalidRequestError("prompt is empty", field="prompt")
        n_vocab = self.model.n_vocab
        if any(t < 0 or t >= n_vocab for t in prompt):
            raise InvalidRequestError(f"prompt token ids must be in [0, {n_vocab})", field="prompt")
        return prompt

    def _check_shift(self, prompt: tuple[int, ...], shift: ContextShift) -> None:
        if not self._memory.can_shift:
            raise InvalidRequestError(f"{self.model.description} cannot shift KV positions", field="overflow")
        if shift.prompt != prompt or shift.n_keep < 0 or shift.n_drop < 0:
            raise InvalidRequestError("the prompt is not the shift's shortened original", field="prompt")

    def _request_cancel(self, request: Request) -> None:
        request.cancel_requested = True
        self._commands.put(_WAKE)

    # -- the worker thread ------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while self._take_commands(block=not self._core.busy):
                try:
                    self._core.step()
                except Exception as exc:  # a bug must not strand the callers: fail them, keep serving
                    logger.exception("engine step failed")
                    self._core.fail_running(BackendError(f"internal engine error: {exc!r}"))
        finally:
            self._shutdown()

    def _take_commands(self, *, block: bool) -> bool:
        """Move submitted requests to the queue. False once `close` was asked."""
        try:
            command = self._commands.get(block=block)
        except queue.Empty:
            return True
        while True:
            if command is _CLOSE:
                return False
            if isinstance(command, Request):
                self._core.add(command)
            elif isinstance(command, _Call):
                command.run(self._core.pinned)
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return True

    def _shutdown(self) -> None:
        core = self._core
        core.shutdown()
        while True:  # requests submitted before close() took the lock
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                break
            if isinstance(command, Request):
                core.finish(command, "cancelled")
            elif isinstance(command, _Call):
                command.error = EngineClosedError("the engine is closed")
                command.done.set()
        if self._context is not None:
            self._context.close()
        self._close_owned_model()

    def _close_owned_model(self) -> None:
        if self._owns_model:
            self.model.close()


def _load_model_file(path: str | os.PathLike[str]) -> Model:
    """Load a GGUF file; a name that is no file gets a hint about packaged models."""
    if not Path(path).is_file() and Path(path).suffix.lower() != ".gguf":
        raise ModelLoadError(
            f"model file not found: {path} (for a packaged model, pass kvchat.models.resolve({os.fspath(path)!r}))",
            path=Path(path),
        )
    return Model(path)

"""`Engine`: one worker thread that owns the llama context and batches every request."""

from __future__ import annotations

import itertools
import logging
import os
import queue
import random
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Generic, TypeVar

import numpy as np

from kvchat.engine.admission import Admission
from kvchat.engine.context_shift import ContextShift, shifted_namespace
from kvchat.engine.conversation import Conversation, read_conversation_file
from kvchat.engine.drafting import index_request
from kvchat.engine.kv_pool import KVPool
from kvchat.engine.pinned import PinnedSequence
from kvchat.engine.pinning import PinnedSequences
from kvchat.engine.prefix_cache import PrefixCache
from kvchat.engine.request import Request
from kvchat.engine.sampling import SamplingParams
from kvchat.engine.scheduler import Scheduler
from kvchat.engine.settings import EngineSettings
from kvchat.engine.speculation import Speculator
from kvchat.engine.state_store import StateStore
from kvchat.engine.stats import EngineStats, StatsBoard, StepTiming
from kvchat.engine.step_planner import ScheduledRow, StepPlanner
from kvchat.engine.stream import Chunk, FinishReason, Stream
from kvchat.errors import (
    BackendError,
    ContextOverflowError,
    ConversationFileError,
    DecodeError,
    EngineClosedError,
    GrammarError,
    InvalidRequestError,
    ModelLoadError,
)
from kvchat.llama import Batch, Context, Model, SamplerChain

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
    :class:`~kvchat.engine.step_planner.StepPlanner`). Thread-safe; close it with
    :meth:`close` or use it as a context manager.
    """

    def __init__(self, model: Model | str | os.PathLike[str], settings: EngineSettings | None = None) -> None:
        self.settings = settings or EngineSettings()
        self._owns_model = not isinstance(model, Model)
        self.model = model if isinstance(model, Model) else _load_model_file(model)
        try:
            self._context = Context(self.model, self.settings.context_params(self.model))
            self._batch = Batch(self._context.n_batch)
        except BaseException:
            self._close_owned_model()
            raise
        self.context_limit: int = min(
            self._context.n_ctx_seq,
            self.model.n_ctx_train or self._context.n_ctx_seq,
            self.settings.max_request_tokens or self._context.n_ctx_seq,
        )
        """Most tokens (prompt + generated) one request may hold."""
        self._planner = StepPlanner(interleaved_call_rows=self.settings.interleaved_call_rows)
        self._commands: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._pool = KVPool(self._context, cache=self._new_prefix_cache(), store=self._new_state_store())
        self._pinned = PinnedSequences(self._pool)
        self._scheduler = Scheduler(
            self._pool,
            Admission(self._pool, compact=self.settings.compact_pool),
            self._pinned,
            max_running=self.settings.max_running,
        )
        self._speculator = self._new_speculator()
        self._request_ids = itertools.count(1)
        self._closing = False
        self._submit_lock = threading.Lock()
        self._stats = StatsBoard()
        self._publish_stats()
        self._thread = threading.Thread(target=self._run, name="kvchat-engine", daemon=True)
        self._thread.start()

    def _new_prefix_cache(self) -> PrefixCache | None:
        if not self.settings.prefix_cache:
            return None
        if self.model.is_recurrent or self.model.is_hybrid:
            logger.info(
                "prefix cache disabled: %s keeps recurrent state, which cannot be cut at a token boundary",
                self.model.description,
            )
            return None
        return PrefixCache()

    def _new_speculator(self) -> Speculator | None:
        s = self.settings
        if s.speculation == "off":
            return None
        if self.model.is_recurrent or self.model.is_hybrid:
            logger.info("speculation off: %s cannot drop rejected draft tokens from its state", self.model.description)
            return None
        return Speculator(max_draft_tokens=s.max_draft_tokens, ngram_cache_entries=s.ngram_cache_entries)

    def _new_state_store(self) -> StateStore | None:
        s = self.settings
        if not s.prefix_cache or (s.cache_ram_bytes == 0 and s.cache_dir is None):
            return None
        layout = "" if s.cache_dir is None else self._context.layout_key()
        return StateStore(
            ram_budget_bytes=s.cache_ram_bytes,
            disk_dir=s.cache_dir,
            disk_budget_bytes=s.cache_disk_bytes,
            layout_key=layout,
        )

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
        prompt = self._checked_prompt(prompt_tokens)
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
        request_id = next(self._request_ids)
        stream = Stream(request_id, on_cancel=lambda: self._request_cancel(request))
        request = Request(
            request_id, prompt, sampling, max_new, stream, self.settings.reservation_step, cache_key=cache_key
        )
        request.grammar = matcher
        if self._speculator is not None:
            # Indexed here, on the caller's thread: a long prediction costs the worker nothing.
            request.draft_indexes = index_request(prompt, sampling.prediction)
        if pinned is not None:
            if (
                pinned.closed
                or len(prompt) <= len(pinned.tokens)
                or list(prompt[: len(pinned.tokens)]) != pinned.tokens
            ):
                raise InvalidRequestError(
                    "the prompt must extend the pinned sequence's resident tokens", field="prompt"
                )
            request.pinned = pinned
        if shift is not None:
            self._check_shift(prompt, shift)
            request.shift, request.original_cache_key = shift, cache_key
            request.cache_key = shifted_namespace(cache_key)
        with self._submit_lock:
            if self._closing:
                raise EngineClosedError("the engine is closed")
            self._commands.put(request)
        return stream

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
            return function(self._pinned)
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
        return self._stats.latest()

    def step_timings(self) -> list[StepTiming]:
        """The latest steps that ran the model (up to 4,096), oldest first: how long
        the worker held every running request at a time."""
        return self._stats.step_timings()

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

    def _checked_prompt(self, prompt_tokens: Sequence[int]) -> tuple[int, ...]:
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
        if not self._context.can_shift:
            raise InvalidRequestError(f"{self.model.description} cannot shift KV positions", field="overflow")
        if shift.prompt != prompt or shift.n_keep < 0 or shift.n_drop < 0:
            raise InvalidRequestError("the prompt is not the shift's shortened original", field="prompt")

    def _request_cancel(self, request: Request) -> None:
        request.cancel_requested = True
        self._commands.put(_WAKE)

    # -- the worker thread ------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while self._take_commands(block=not (self._scheduler.running or self._scheduler.waiting)):
                try:
                    self._step()
                except Exception as exc:  # a bug must not strand the callers: fail them, keep serving
                    logger.exception("engine step failed")
                    self._fail_running(BackendError(f"internal engine error: {exc!r}"))
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
                self._scheduler.add(command)
            elif isinstance(command, _Call):
                command.run(self._pinned)
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return True

    def _step(self) -> None:
        started, sampling_cpu = time.perf_counter(), 0.0
        self._reap_cancelled()
        admitted = self._scheduler.admit()
        for request in admitted:
            if request.sampler is None and not request.sampling.is_plain_greedy:  # (a resumed one keeps its own)
                request.sampler = self._new_sampler(request.sampling)
        for request in self._scheduler.reserve_step():
            logger.warning("request %d ends: the KV pool has no room for more tokens", request.request_id)
            self._finish(request, "length")
        if admitted:
            self._publish_stats()
        decoded = False
        running = self._scheduler.running
        if self._speculator is not None:
            self._speculator.propose(
                running,
                capacity=self._batch.capacity,
                call_rows=self._planner.call_rows(len(running), self._batch.capacity),
            )
        for rows in self._planner.calls(list(running), self._batch):
            try:
                self._context.decode(self._batch)
            except DecodeError as exc:
                logger.error("%s; failing the %d running requests", exc, len(running))
                self._fail_running(exc)
                return
            decoded = True
            sampling_started = time.thread_time()
            for scheduled in rows:
                self._sample(scheduled)
            sampling_cpu += time.thread_time() - sampling_started
        if decoded:
            self._stats.counters.steps += 1
            self._stats.record_step(StepTiming(started, time.perf_counter() - started, sampling_cpu))
        self._publish_stats()

    def _new_sampler(self, sampling: SamplingParams) -> SamplerChain:
        return SamplerChain(
            self.model,
            temperature=sampling.temperature,
            top_k=sampling.top_k,
            top_p=sampling.top_p,
            min_p=sampling.min_p,
            repeat_penalty=sampling.repeat_penalty,
            presence_penalty=sampling.presence_penalty,
            frequency_penalty=sampling.frequency_penalty,
            penalty_last_n=sampling.penalty_last_n,
            logit_bias=sampling.logit_bias,
            seed=sampling.seed if sampling.seed is not None else random.getrandbits(32),
        )

    def _sample(self, scheduled: ScheduledRow) -> None:
        request = scheduled.request
        try:
            if scheduled.draft:
                self._verify(request, scheduled.row, scheduled.draft)
            else:
                self._advance(request, (self._pick(request, scheduled.row),))
        except GrammarError as exc:
            self._fail(request, exc)
        except Exception as exc:
            logger.exception("request %d failed while sampling", request.request_id)
            self._fail(request, BackendError(f"sampling failed: {exc!r}"))

    def _pick(self, request: Request, row: int) -> int:
        """Sample the request's next token from batch row `row` (its sampler and its
        grammar record it).

        With a grammar, the token is picked as if unconstrained first; only if the
        grammar refuses it is it picked again among the tokens the grammar allows
        (see `GrammarMatcher.pick`). For a random draw this is still a draw from the
        constrained distribution: a token x the grammar allows comes with p(x) on the
        first try plus (1 - Z) p(x) / Z on the second, Z being the allowed mass.
        """
        sampler, grammar = request.sampler, request.grammar
        if grammar is None:
            if sampler is None:
                return int(np.argmax(self._context.logits(row)))
            return sampler.sample(self._context, row)
        token = grammar.pick(self._context.logits(row), _argmax if sampler is None else sampler.choose)
        if sampler is not None:
            sampler.accept(token)
        return token

    def _verify(self, request: Request, row: int, draft: tuple[int, ...]) -> None:
        """Sample at the last token's row and at each drafted row while the draft
        matches (see `Speculator` for why this keeps the output's distribution);
        drop the cells of the drafted tokens that were not accepted, then emit."""
        emitted = [self._pick(request, row)]
        while len(emitted) <= len(draft) and emitted[-1] == draft[len(emitted) - 1]:
            emitted.append(self._pick(request, row + len(emitted)))
        accepted = len(emitted) - 1
        rejected = len(draft) - accepted
        if rejected:
            self._pool.remove(_seq_id(request), request.n_past - rejected, -1)
            request.n_past -= rejected
        request.draft_tokens += len(draft)
        request.accepted_draft_tokens += accepted
        if self._speculator is not None:
            self._speculator.verified(request, len(draft), accepted)
        # Should a token end the request, keep the KV that decoding without drafts
        # would hold then: the tokens before it (the cache stays the same).
        first_end = request.n_past - accepted
        self._advance(request, emitted, kv_ends=range(first_end, first_end + len(emitted)))

    def _advance(self, request: Request, tokens: Sequence[int], kv_ends: Sequence[int] | None = None) -> None:
        """Emit one step's sampled tokens, and the tokens the request's grammar forces
        after them, as one chunk, up to the first that ends the request.
        `kv_ends[i]`: where the request's KV ends should `tokens[i]` end it."""
        texts: list[str] = []
        reason: FinishReason | None = None
        for i, token in enumerate(tokens):
            if kv_ends is not None:
                request.kv_end = kv_ends[i]
            if token in request.sampling.stop_token_ids or self.model.is_end_of_generation(token):
                request.note_first_token()
                reason = "stop"
                break
            reason = self._take(request, token, texts)
            if reason is not None:
                break
        grammar = request.grammar
        if reason is None and grammar is not None:
            if grammar.complete:
                reason = "stop"  # nothing but the end may follow: no step for it
            else:
                # Forced tokens are evaluated as rows of the next call. On a CPU each row
                # costs about a quarter of a decode step, and every request in that call
                # waits for it (like a prompt being evaluated; docs/benchmarks.md,
                # "Structured output on llguidance").
                # So they are appended only while the request runs alone; otherwise the
                # grammar still gives each next forced token without a mask (`pick`).
                alone = len(self._scheduler.running) == 1
                room = request.max_new_tokens - len(request.generated) if alone else 0
                for token in grammar.forced(room):
                    reason = self._take(request, token, texts, forced=True)
                    if reason is not None:
                        break
        if texts:
            request.stream._push(Chunk("".join(texts), tuple(request.generated[-len(texts) :])))
        if reason is not None:
            self._finish(request, reason)
        request.kv_end = None

    def _take(self, request: Request, token: int, texts: list[str], *, forced: bool = False) -> FinishReason | None:
        """Record one generated token and its text; the finish reason if it ends the request."""
        request.record_token(token, forced=forced)
        delta = request.text.push(self.model.token_to_bytes(token))
        texts.append(delta.text)
        if delta.stopped:
            return "stop"
        if len(request.generated) >= request.max_new_tokens:
            return "length"
        return None

    def _reap_cancelled(self) -> None:
        scheduler = self._scheduler
        for request in [r for r in (*scheduler.running, *scheduler.waiting) if r.cancel_requested]:
            self._finish(request, "cancelled")

    # -- ending requests --------------------------------------------------------------------------

    def _finish(self, request: Request, reason: FinishReason) -> None:
        tail = request.text.finish().text
        usage = request.usage(reason, completion_tokens=len(request.generated))
        self._release(request, keep=True)
        self._stats.counters.count_finished(usage)
        self._publish_stats()
        request.stream._push(Chunk(tail, (), usage))

    def _fail(self, request: Request, error: BaseException) -> None:
        self._release(request, keep=False)  # its KV may be incomplete: keep nothing
        self._publish_stats()
        request.stream._push(error)

    def _fail_running(self, error: BaseException) -> None:
        for request in list(self._scheduler.running):
            self._fail(request, error)

    def _release(self, request: Request, *, keep: bool) -> None:
        """Free a request's sampler and sequence; park its KV in the cache if `keep`."""
        request.close_sampler()
        self._scheduler.remove(request)
        if self._speculator is not None:
            self._speculator.finished(request, keep=keep)
        if keep and request.seq_id is not None and request.kv_end is not None and request.n_past > request.kv_end:
            # It ended inside a verified draft: drop the cells past what decoding
            # without drafts would hold (drafted tokens after its end are not its own).
            self._pool.remove(request.seq_id, request.kv_end, -1)
            request.n_past = request.kv_end
        if request.pinned is not None:
            self._pinned.finish(request, keep=keep)
        else:
            self._pool.finish(request, keep=keep)

    def _shutdown(self) -> None:
        for request in [*self._scheduler.running, *self._scheduler.waiting]:
            self._finish(request, "cancelled")
        while True:  # requests submitted before close() took the lock
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                break
            if isinstance(command, Request):
                self._finish(command, "cancelled")
            elif isinstance(command, _Call):
                command.error = EngineClosedError("the engine is closed")
                command.done.set()
        try:
            self._pool.persist()
        except Exception:  # never let a cache problem stop the shutdown
            logger.exception("could not persist the prefix cache")
        self._batch.close()
        self._context.close()
        self._close_owned_model()

    def _close_owned_model(self) -> None:
        if self._owns_model:
            self.model.close()

    # -- stats ------------------------------------------------------------------------------------------

    def _publish_stats(self) -> None:
        ngrams = self._speculator.ngram_cache if self._speculator is not None else None
        self._stats.publish(
            self._scheduler,
            self._pool,
            ngram_entries=len(ngrams) if ngrams is not None else 0,
            ngram_bytes=ngrams.bytes if ngrams is not None else 0,
        )


def _argmax(logits: np.ndarray) -> int:
    return int(np.argmax(logits))


def _seq_id(request: Request) -> int:
    if request.seq_id is None:
        raise RuntimeError(f"request {request.request_id} has no KV sequence")
    return request.seq_id


def _load_model_file(path: str | os.PathLike[str]) -> Model:
    """Load a GGUF file; a name that is no file gets a hint about packaged models."""
    if not Path(path).is_file() and Path(path).suffix.lower() != ".gguf":
        raise ModelLoadError(
            f"model file not found: {path} (for a packaged model, pass kvchat.models.resolve({os.fspath(path)!r}))",
            path=Path(path),
        )
    return Model(path)

"""`ChatRuntime`: chat on one engine, with the state that chat keeps beside it.

That state is the chat tokenizer (the model's own template) and the
generated-token memory (the exact ids of recent replies, per tenant). It lives
in one explicit object, made once and handed to whoever chats on the engine:
the server (`create_app(chat_runtime=...)`), `ChatSession(chat_runtime=...)`
and the integrations. Those that are given none use the engine's shared
runtime, :meth:`ChatRuntime.shared`, so that on one engine they all share one
memory (and its one journal file), as :func:`kvchat.chat.complete` does.

:meth:`ChatRuntime.complete` answers a chat in three phases: plan (a pure
:class:`~kvchat.chat.plan.ChatPlan` of the template and the request), fit (the
prompt's tokens under the overflow policy), submit (to the engine). A caller
that may lose interest before the work is done (a server whose client
disconnected, or whose time limit passed) passes a `cancelled` check: it is
read between the phases (before planning, after it, before tokenizing the
prediction, before each render while fitting, before submitting), and once it
is True, `complete()` stops there and returns a reply that has already ended,
with finish reason ``"cancelled"``, having queued nothing.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable, Mapping, Sequence
from functools import cached_property
from pathlib import Path
from typing import Any

from kvchat.chat.fit import OverflowPolicy, fit_prompt
from kvchat.chat.history import GeneratedTokenMemory
from kvchat.chat.plan import call_format, plan_chat
from kvchat.chat.stream import ChatStream, DeltaTranslator
from kvchat.chat.template import ChatTemplate
from kvchat.chat.tokenizer import ChatTokenizer
from kvchat.chat.tool_calls import StreamingToolCallParser
from kvchat.engine import Engine, SamplingParams
from kvchat.errors import InvalidRequestError

__all__ = ["ChatRuntime", "runtime_for"]


class ChatRuntime:
    """Chat on `engine`: its chat tokenizer and generated-token memory, and
    :meth:`complete`.

    `tokenizer` must be one of the engine's model; by default it is made, on
    first use, with the model's own template and a fresh generated-token memory
    kept in RAM. Make one runtime per engine and share it (it is thread-safe),
    or use the engine's shared one (:meth:`shared`), whose memory persists
    under the engine's `cache_dir`.
    """

    def __init__(self, engine: Engine, tokenizer: ChatTokenizer | None = None) -> None:
        if tokenizer is not None and tokenizer.model is not engine.model:
            raise ValueError("the chat tokenizer is not one of the engine's model")
        self.engine = engine
        self._tokenizer = tokenizer
        self._make_tokenizer: Callable[[Engine], ChatTokenizer] = _own_tokenizer
        self._lock = threading.Lock()

    @classmethod
    def shared(cls, engine: Engine) -> ChatRuntime:
        """The engine's shared runtime: one tokenizer and one generated-token memory
        per engine, made on first use, whose memory is journaled next to the
        engine's disk cache (per model file) when `EngineSettings.cache_dir` is set."""
        runtime = cls(engine)
        runtime._make_tokenizer = _shared_tokenizer
        return runtime

    @property
    def tokenizer(self) -> ChatTokenizer:
        """The chat tokenizer prompts are made with (made on first use: the template
        is loaded, and a journal read, only once there is a chat)."""
        with self._lock:
            if self._tokenizer is None:
                self._tokenizer = self._make_tokenizer(self.engine)
            return self._tokenizer

    @property
    def template(self) -> ChatTemplate:
        """The chat template prompts are rendered with."""
        return self.tokenizer.template

    @property
    def memory(self) -> GeneratedTokenMemory | None:
        """The exact ids of recent replies (None if the tokenizer has no memory)."""
        return self.tokenizer.memory

    @cached_property
    def tag_tokens(self) -> dict[str, int]:
        """The template's tool-call tags that are one token of the model (read with
        special tokens), with their ids."""
        fmt = call_format(self.template)
        tags = [tag for tag in (fmt.start, fmt.end) if tag]
        found = {tag: self.engine.model.tokenize(tag, parse_special=True) for tag in tags}
        return {tag: ids[0] for tag, ids in found.items() if len(ids) == 1}

    def complete(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        tools: Sequence[Mapping[str, Any]] | None = None,
        tool_choice: str | Mapping[str, Any] | None = None,
        response_format: Mapping[str, Any] | None = None,
        sampling: SamplingParams | None = None,
        overflow: OverflowPolicy = "error",
        n_keep: int | None = None,
        cache_key: str | None = None,
        prediction: str | None = None,
        cancelled: Callable[[], bool] | None = None,
    ) -> ChatStream:
        """Answer a chat: render `messages`, generate, and stream the assistant's reply.

        - `tools` (OpenAI function schemas) are rendered through the model's template;
          `tool_choice` ``"auto"`` (default with tools) lets the model choose,
          ``"required"`` or a named function forces a well-formed call by grammar,
          ``"none"`` hides the tools, except right after tool results: that reply
          keeps them (its prompt continues the one that made the call) and is closed
          by a system note asking for the answer (see `kvchat.chat.tool_round`).
        - `response_format` ``{"type": "json_object"}`` or ``{"type": "json_schema", ...}``
          constrains the output by grammar.
        - `overflow`: when the prompt plus `max_tokens` exceed the context, ``"error"``
          raises `ContextOverflowError`; ``"truncate_oldest"`` drops the oldest
          non-system messages, whole turns at a time, until it fits; ``"shift"`` keeps
          the first `n_keep` tokens (default: the leading system messages) and drops
          the oldest half of the rest, in whole halves, until it fits, building the
          shortened prompt's KV by shifting the cached KV of the full one (models that
          cannot shift positions raise `InvalidRequestError`).
        - `cache_key` keeps tenants apart: their cached prefixes, and the exact ids of
          their earlier replies (the generated-token memory).
        - `prediction`: the reply's text as the caller expects it (OpenAI's predicted
          outputs), say the file an edit request will mostly repeat. It is tokenized
          as plain text (no BOS, special-token text as ordinary characters) and
          drafted from while the engine's speculation is on: a reply that repeats it
          comes faster, and the reply is the same with or without it. It replaces any
          `sampling.prediction`; at most `kvchat.engine.sampling.MAX_PREDICTION_TOKENS` tokens.
        - `cancelled`: read between the phases of the work (see the module's
          docstring); once it returns True, the call stops and returns a reply that
          has ended with finish reason ``"cancelled"``. If it turns True just after
          the request was submitted, the request is cancelled (it ends the same way).

        Raises `InvalidRequestError` (or its subclasses) for bad input before anything
        is queued.
        """
        try:
            return self._complete(
                messages,
                tools=tools,
                tool_choice=tool_choice,
                response_format=response_format,
                sampling=sampling or SamplingParams(),
                overflow=overflow,
                n_keep=n_keep,
                cache_key=cache_key,
                prediction=prediction,
                cancelled=cancelled or _never,
            )
        except _Cancelled:
            return ChatStream.cancelled()

    def prompt_tokens(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        tools: Sequence[Mapping[str, Any]] | None = None,
        tool_choice: str | Mapping[str, Any] | None = None,
        cache_key: str | None = None,
    ) -> int:
        """How many tokens :meth:`complete` would submit for this chat, if it fits the
        context: the same plan (template, visible tools, tool round) and rendering,
        with nothing generated. Raises `InvalidRequestError` for bad input."""
        plan = plan_chat(self.template, messages, tools=tools, tool_choice=tool_choice, tag_tokens=self.tag_tokens)
        return len(self.tokenizer.encode(plan.messages, tools=plan.tools, namespace=cache_key))

    def _complete(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        tools: Sequence[Mapping[str, Any]] | None,
        tool_choice: str | Mapping[str, Any] | None,
        response_format: Mapping[str, Any] | None,
        sampling: SamplingParams,
        overflow: OverflowPolicy,
        n_keep: int | None,
        cache_key: str | None,
        prediction: str | None,
        cancelled: Callable[[], bool],
    ) -> ChatStream:
        """Plan, fit, submit; raises `_Cancelled` between the phases."""
        _checkpoint(cancelled)
        plan = plan_chat(
            self.template,
            messages,
            tools=tools,
            tool_choice=tool_choice,
            response_format=response_format,
            tag_tokens=self.tag_tokens,
        )
        _checkpoint(cancelled)
        predicted = None if prediction is None else self._prediction_tokens(prediction, cancelled)
        params = plan.sampling(sampling, prediction=predicted)
        tokens, shift = fit_prompt(
            self.tokenizer,
            plan.messages,
            plan.tools,
            limit=self.engine.context_limit,
            need=params.max_tokens or 1,
            overflow=overflow,
            n_keep=n_keep,
            namespace=cache_key,
            before_render=lambda: _checkpoint(cancelled),
        )
        _checkpoint(cancelled)
        stream = self.engine.submit(tokens, params, cache_key=cache_key, shift=shift)
        if cancelled():  # (turned True while the grammar compiled, say): it ends cancelled within a step
            stream.cancel()
        parser = StreamingToolCallParser(plan.tool_format) if plan.tool_format else None
        return ChatStream(stream, DeltaTranslator(parser, self.memory, cache_key), len(tokens))

    def _prediction_tokens(self, prediction: str, cancelled: Callable[[], bool]) -> tuple[int, ...]:
        """`prediction` as the model's tokens: plain text, no BOS, special-token text not parsed.

        Raises `InvalidRequestError` (field ``prediction``) for text that is not a
        string or not valid Unicode; the length is checked by `SamplingParams`.
        """
        _checkpoint(cancelled)
        if not isinstance(prediction, str):
            raise InvalidRequestError("prediction must be text", field="prediction")
        try:
            return tuple(self.engine.model.tokenize(prediction, add_special=False, parse_special=False))
        except InvalidRequestError as exc:
            raise InvalidRequestError(f"prediction: {exc}", field="prediction") from None


def runtime_for(engine: Engine, runtime: ChatRuntime | None = None) -> ChatRuntime:
    """`runtime`, checked to run on `engine` (else `ValueError`), or the engine's
    shared runtime when it is None."""
    if runtime is None:
        return ChatRuntime.shared(engine)
    if runtime.engine is not engine:
        raise ValueError("the chat runtime runs on another engine")
    return runtime


class _Cancelled(Exception):
    """`complete()`'s caller lost interest: the work stops at the next phase."""


def _never() -> bool:
    return False


def _checkpoint(cancelled: Callable[[], bool]) -> None:
    """Stop the work here (raise `_Cancelled`) if the caller has cancelled it."""
    if cancelled():
        raise _Cancelled


def _own_tokenizer(engine: Engine) -> ChatTokenizer:
    """A tokenizer of the engine's model with its own template and a fresh memory in RAM."""
    return ChatTokenizer(engine.model, memory=GeneratedTokenMemory(n_vocab=engine.model.n_vocab))


# The shared runtimes' state, per engine (weakly: it goes with the engine). It holds
# tokenizers rather than runtimes: a runtime refers to its engine, which would keep
# the key alive.
_shared_tokenizers: weakref.WeakKeyDictionary[Engine, ChatTokenizer] = weakref.WeakKeyDictionary()
_shared_lock = threading.Lock()


def _shared_tokenizer(engine: Engine) -> ChatTokenizer:
    with _shared_lock:
        tokenizer = _shared_tokenizers.get(engine)
        if tokenizer is None:
            memory = GeneratedTokenMemory(journal=_journal_path(engine), n_vocab=engine.model.n_vocab)
            tokenizer = _shared_tokenizers[engine] = ChatTokenizer(engine.model, memory=memory)
        return tokenizer


def _journal_path(engine: Engine) -> Path | None:
    """Where the shared memory persists: next to the engine's disk cache, per model file."""
    if engine.settings.cache_dir is None:
        return None
    return Path(engine.settings.cache_dir) / f"generated-tokens-{engine.model.sha256()[:16]}.jsonl"

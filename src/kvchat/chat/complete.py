"""`complete()`: the one chat entry point every front end uses.

Messages in, a stream of message deltas out. It renders the history with the
model's template (injection-safe, token-faithful), applies the context-overflow
policy, turns `tool_choice` and `response_format` into a grammar, tokenizes a
`prediction` of the reply (speculative decoding's drafts), submits the tokens to
the engine, and turns the engine's text back into content and tool calls in the
model's own tool-call format.

A caller that may lose interest before the work is done (a server whose client
disconnected, or whose time limit passed) passes a `cancelled` check: it is read
between the phases (rendering, each attempt at fitting an overflowing
conversation, tokenizing the prediction, submitting), and once it is True,
`complete()` stops there and returns a reply that has already ended, with finish
reason ``"cancelled"``, having queued nothing.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

from kvchat.chat.history import GeneratedTokenMemory
from kvchat.chat.response_format import grammar_for_response_format
from kvchat.chat.tokenizer import ChatTokenizer
from kvchat.chat.tool_calls import (
    HERMES,
    StreamingToolCallParser,
    ToolCall,
    ToolCallEvent,
    ToolCallFormat,
    detect_format,
)
from kvchat.chat.tool_requests import normalize_tool_choice, tool_call_grammar, validate_tools
from kvchat.chat.tool_round import NO_CALL_OPENING, closing_messages
from kvchat.engine import Chunk, Engine, Grammar, SamplingParams, Stream, Usage
from kvchat.engine.context_shift import ContextShift
from kvchat.errors import ContextOverflowError, InvalidRequestError

OverflowPolicy = Literal["error", "truncate_oldest", "shift"]
ChatFinishReason = Literal["stop", "length", "tool_calls", "cancelled"]


@dataclass(frozen=True)
class ChatDelta:
    """One piece of an assistant message: content text, or whole tool calls.

    The last delta of a stream carries `usage` and `finish_reason` (``"tool_calls"``
    when the model called tools).
    """

    content: str = ""
    tool_calls: tuple[ToolCall, ...] = ()
    usage: Usage | None = None
    finish_reason: ChatFinishReason | None = None


@dataclass(frozen=True)
class ChatCompletion:
    """A whole assistant message: content (None if it only called tools), tool calls, usage.

    `usage` is the engine's, speculative decoding's counts included
    (`draft_tokens`, `accepted_draft_tokens`, `rejected_draft_tokens`).
    """

    content: str | None
    tool_calls: tuple[ToolCall, ...]
    usage: Usage
    finish_reason: ChatFinishReason

    def to_message(self) -> dict[str, Any]:
        """The assistant message in OpenAI's shape, ready to append to the history."""
        message: dict[str, Any] = {"role": "assistant", "content": self.content}
        if self.tool_calls:
            message["tool_calls"] = [call.to_openai() for call in self.tool_calls]
        return message


class _Translator:
    """Engine chunks to chat deltas: tool-call parsing and remembering the reply's ids."""

    def __init__(
        self, parser: StreamingToolCallParser | None, memory: GeneratedTokenMemory | None, namespace: str | None
    ) -> None:
        self._parser = parser
        self._memory = memory
        self._namespace = namespace
        self._text: list[str] = []
        self._ids: list[int] = []
        self._called = False

    def translate(self, chunk: Chunk) -> list[ChatDelta]:
        self._text.append(chunk.text)
        self._ids.extend(chunk.token_ids)
        deltas = self._events(self._parser.feed(chunk.text)) if self._parser else [ChatDelta(chunk.text)]
        if chunk.usage is not None:
            if self._parser:
                deltas += self._events(self._parser.finish())
            reason: ChatFinishReason = "tool_calls" if self._called else chunk.usage.finish_reason
            if self._memory is not None and not self._called:
                self._memory.remember("".join(self._text), self._ids, namespace=self._namespace)
            deltas.append(ChatDelta(usage=chunk.usage, finish_reason=reason))
        return [d for d in deltas if d.content or d.tool_calls or d.usage]

    def _events(self, events: list) -> list[ChatDelta]:
        out = []
        for event in events:
            if isinstance(event, ToolCallEvent):
                self._called = True
                out.append(ChatDelta(tool_calls=(event.call,)))
            else:
                out.append(ChatDelta(event.text))
        return out


_CANCELLED = ChatDelta(
    usage=Usage(
        prompt_tokens=0,
        cached_tokens=0,
        evaluated_tokens=0,
        completion_tokens=0,
        time_to_first_token=None,
        finish_reason="cancelled",
    ),
    finish_reason="cancelled",
)
"""The one delta of a reply that :func:`complete` stopped before submitting it."""


class ChatStream:
    """The reply to :func:`complete`: iterate it (sync or async) for :class:`ChatDelta`s,
    or :meth:`collect` it. Leaving an async iteration early, or :meth:`cancel`,
    stops generation within one engine step.

    Without an engine `stream` (a `complete()` cancelled before it submitted),
    the reply is one delta with no tokens and finish reason ``"cancelled"``.
    """

    def __init__(self, stream: Stream | None, translator: _Translator, prompt_tokens: int) -> None:
        self._stream = stream
        self._translator = translator
        self.prompt_tokens = prompt_tokens
        """Tokens of the rendered prompt (after any truncation; 0 if never submitted)."""

    def cancel(self) -> None:
        """Stop generating; the stream ends with finish reason ``cancelled``."""
        if self._stream is not None:
            self._stream.cancel()

    def __iter__(self) -> Iterator[ChatDelta]:
        if self._stream is None:
            yield _CANCELLED
            return
        for chunk in self._stream:
            yield from self._translator.translate(chunk)

    async def __aiter__(self) -> AsyncIterator[ChatDelta]:
        if self._stream is None:
            yield _CANCELLED
            return
        async for chunk in self._stream:
            for delta in self._translator.translate(chunk):
                yield delta

    def collect(self) -> ChatCompletion:
        """Read the whole reply (blocking)."""
        return _gather(iter(self))

    async def acollect(self) -> ChatCompletion:
        """Read the whole reply from asyncio code."""
        return _gather([d async for d in self])


def _gather(deltas: Iterator[ChatDelta] | list[ChatDelta]) -> ChatCompletion:
    content: list[str] = []
    calls: list[ToolCall] = []
    last = None
    for delta in deltas:
        content.append(delta.content)
        calls.extend(delta.tool_calls)
        last = delta
    assert last is not None and last.usage is not None and last.finish_reason is not None
    text = "".join(content)
    return ChatCompletion(text if text or not calls else None, tuple(calls), last.usage, last.finish_reason)


_tokenizers: weakref.WeakKeyDictionary[Engine, ChatTokenizer] = weakref.WeakKeyDictionary()
_tokenizers_lock = threading.Lock()


def chat_tokenizer(engine: Engine) -> ChatTokenizer:
    """The engine's shared chat tokenizer (one template, one generated-token memory,
    kept apart per `cache_key`)."""
    with _tokenizers_lock:
        tokenizer = _tokenizers.get(engine)
        if tokenizer is None:
            memory = GeneratedTokenMemory(journal=_journal_path(engine), n_vocab=engine.model.n_vocab)
            tokenizer = _tokenizers[engine] = ChatTokenizer(engine.model, memory=memory)
        return tokenizer


def _journal_path(engine: Engine) -> Path | None:
    """Where the generated-token memory persists: next to the engine's disk cache, per model file."""
    if engine.settings.cache_dir is None:
        return None
    return Path(engine.settings.cache_dir) / f"generated-tokens-{engine.model.sha256()[:16]}.jsonl"


def complete(
    engine: Engine,
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
        return _complete(
            engine,
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
        return ChatStream(None, _Translator(None, None, cache_key), 0)


class _Cancelled(Exception):
    """`complete()`'s caller lost interest: the work stops at the next phase."""


def _never() -> bool:
    return False


def _checkpoint(cancelled: Callable[[], bool]) -> None:
    """Stop the work here (raise `_Cancelled`) if the caller has cancelled it."""
    if cancelled():
        raise _Cancelled


def _complete(
    engine: Engine,
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
    """:func:`complete`'s work, phase by phase; raises `_Cancelled` between phases."""
    _checkpoint(cancelled)
    tokenizer = chat_tokenizer(engine)
    if tools is not None:
        validate_tools(tools)
    choice = normalize_tool_choice(tool_choice, tools)
    prompt_messages = list(messages)
    visible_tools = None if choice == "none" else (list(tools) if tools else None)
    closed = closing_messages(tokenizer.template, prompt_messages, tools) if choice == "none" and tools else None
    tool_format = (detect_format(tokenizer.template.source) or HERMES) if visible_tools or closed else None
    if tool_format is not None and tool_format.bare_start is None:
        # Small models often write the call's JSON without its tags: a reply that
        # starts with a JSON object naming a function and its arguments is a call.
        tool_format = replace(tool_format, bare_start="{")
    _checkpoint(cancelled)
    grammar: Grammar | None
    if choice not in ("none", "auto"):
        forced = None if choice == "required" else choice
        call_format = tool_format or HERMES
        grammar = tool_call_grammar(
            visible_tools or [], name=forced, format=call_format, tag_tokens=_tag_tokens(engine, call_format)
        )
    else:
        grammar = grammar_for_response_format(response_format)
    if closed is not None and tools and tool_format is not None:  # (`closed` implies both)
        prompt_messages, visible_tools = closed, list(tools)
        # Ban the token that opens a call (where the opening is one token).
        opening = _tag_tokens(engine, tool_format).get(tool_format.start)
        if opening is not None:
            sampling = replace(sampling, logit_bias={**sampling.logit_bias, opening: -100.0})
        grammar = grammar or NO_CALL_OPENING
        tool_format = None  # "none": nothing in the reply is parsed as a call
    if grammar is not None:
        sampling = replace(sampling, grammar=grammar)
    if prediction is not None:
        _checkpoint(cancelled)
        sampling = replace(sampling, prediction=_prediction_tokens(engine, prediction))
    tokens, shift = _fit(
        engine, tokenizer, prompt_messages, visible_tools, sampling, overflow, n_keep, cache_key, cancelled
    )
    _checkpoint(cancelled)
    stream = engine.submit(tokens, sampling, cache_key=cache_key, shift=shift)
    if cancelled():  # (turned True while the grammar compiled, say): it ends cancelled within a step
        stream.cancel()
    parser = StreamingToolCallParser(tool_format) if tool_format else None
    return ChatStream(stream, _Translator(parser, tokenizer.memory, cache_key), len(tokens))


def _tag_tokens(engine: Engine, tool_format: ToolCallFormat) -> dict[str, int]:
    """The format's tags that are one token of the model (read with special tokens), with their ids."""
    tags: dict[str, int] = {}
    for tag in (tool_format.start, tool_format.end):
        if not tag:
            continue
        ids = engine.model.tokenize(tag, parse_special=True)
        if len(ids) == 1:
            tags[tag] = ids[0]
    return tags


def _prediction_tokens(engine: Engine, prediction: str) -> tuple[int, ...]:
    """`prediction` as the model's tokens: plain text, no BOS, special-token text not parsed.

    Raises `InvalidRequestError` (field ``prediction``) for text that is not a
    string or not valid Unicode; the length is checked by `SamplingParams`.
    """
    if not isinstance(prediction, str):
        raise InvalidRequestError("prediction must be text", field="prediction")
    try:
        return tuple(engine.model.tokenize(prediction, add_special=False, parse_special=False))
    except InvalidRequestError as exc:
        raise InvalidRequestError(f"prediction: {exc}", field="prediction") from None


def _fit(
    engine: Engine,
    tokenizer: ChatTokenizer,
    messages: list[Mapping[str, Any]],
    tools: list[Mapping[str, Any]] | None,
    sampling: SamplingParams,
    overflow: OverflowPolicy,
    n_keep: int | None,
    namespace: str | None,
    cancelled: Callable[[], bool] = _never,
) -> tuple[list[int], ContextShift | None]:
    """The prompt's tokens, after applying the overflow policy (and the shift, if any).

    ``"truncate_oldest"`` keeps the fewest dropped turns that fit (see
    :func:`_turn_starts` for what a turn is). Rather than render the conversation
    once per dropped turn (quadratic in its length), it renders the whole
    conversation, then the one that keeps only the last turn, then bisects the
    number of dropped turns in between: at most ``log2(turns) + 2`` renders.
    That gives the same prompt as dropping one turn at a time, since dropping
    more turns never makes the prompt longer (a template renders each message
    on its own). The `cancelled` check is read before every render.
    """
    if overflow not in ("error", "truncate_oldest", "shift"):
        raise InvalidRequestError(f"unknown overflow policy {overflow!r}", field="overflow")
    need = sampling.max_tokens or 1
    limit = engine.context_limit

    def encode(kept: list[Mapping[str, Any]]) -> list[int]:
        _checkpoint(cancelled)
        return tokenizer.encode(kept, tools=tools, namespace=namespace)

    tokens = encode(messages)
    if len(tokens) + need <= limit:
        return tokens, None
    if overflow == "shift":
        keep = _system_prefix_length(tokenizer, messages, tokens, namespace) if n_keep is None else n_keep
        shift = ContextShift.to_fit(tuple(tokens), keep, limit - need)
        return list(shift.prompt), shift
    starts = _turn_starts(messages) if overflow == "truncate_oldest" else []
    if len(starts) < 2:  # nothing may be dropped
        raise ContextOverflowError(prompt_tokens=len(tokens), max_tokens=need, context_limit=limit)

    def dropping(turns: int) -> list[Mapping[str, Any]]:
        return messages[: starts[0]] + messages[starts[turns] :]

    fits, fitted = len(starts) - 1, encode(dropping(len(starts) - 1))  # only the last turn left
    if len(fitted) + need > limit:
        raise ContextOverflowError(prompt_tokens=len(fitted), max_tokens=need, context_limit=limit)
    too_few = 0  # dropping this many turns does not fit; dropping `fits` does
    while fits - too_few > 1:
        middle = (too_few + fits) // 2
        candidate = encode(dropping(middle))
        if len(candidate) + need <= limit:
            fits, fitted = middle, candidate
        else:
            too_few = middle
    return fitted, None


def _turn_starts(messages: Sequence[Mapping[str, Any]]) -> list[int]:
    """Where the kept part of `messages` may begin, oldest first: dropping ``k`` turns
    keeps ``messages[:starts[0]] + messages[starts[k]:]``.

    ``starts[0]`` is the first message after the leading system (and developer)
    messages, which are always kept. A turn runs from there up to the next user
    message: a message and the replies, tool calls and tool results (and any
    system message) that follow it, so a tool call is never kept without its
    results or the other way round. The last turn, the one being answered, is
    never dropped. Empty if there is no message but system ones.
    """
    first = next((i for i, m in enumerate(messages) if m.get("role") not in ("system", "developer")), None)
    if first is None:
        return []
    return [first, *(i for i in range(first + 1, len(messages)) if messages[i].get("role") == "user")]


def _system_prefix_length(
    tokenizer: ChatTokenizer, messages: list[Mapping[str, Any]], tokens: list[int], namespace: str | None
) -> int:
    """Tokens at the start of the prompt that render the leading system messages."""
    n = 0
    while n < len(messages) and messages[n].get("role") in ("system", "developer"):
        n += 1
    if n == 0:
        return 0
    system = tokenizer.encode(messages[:n], add_generation_prompt=False, namespace=namespace)
    common = 0
    while common < min(len(system), len(tokens)) and system[common] == tokens[common]:
        common += 1
    return common

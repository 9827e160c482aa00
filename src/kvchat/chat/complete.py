"""`complete()`: the one chat entry point every front end uses.

Messages in, a stream of message deltas out. It renders the history with the
model's template (injection-safe, token-faithful), applies the context-overflow
policy, turns `tool_choice` and `response_format` into a grammar, tokenizes a
`prediction` of the reply (speculative decoding's drafts), submits the tokens to
the engine, and turns the engine's text back into content and tool calls in the
model's own tool-call format.

``complete(engine, ...)`` is ``ChatRuntime.shared(engine).complete(...)``: it
runs on the engine's shared chat runtime (its tokenizer and generated-token
memory; see :mod:`kvchat.chat.runtime`). A caller that holds a
:class:`ChatRuntime` of its own calls its :meth:`~ChatRuntime.complete`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from kvchat.chat.fit import OverflowPolicy
from kvchat.chat.runtime import ChatRuntime
from kvchat.chat.stream import ChatCompletion, ChatDelta, ChatFinishReason, ChatStream
from kvchat.chat.tokenizer import ChatTokenizer
from kvchat.engine import Engine, SamplingParams

__all__ = [
    "ChatCompletion",
    "ChatDelta",
    "ChatFinishReason",
    "ChatStream",
    "OverflowPolicy",
    "chat_tokenizer",
    "complete",
]


def chat_tokenizer(engine: Engine) -> ChatTokenizer:
    """The engine's shared chat tokenizer (one template, one generated-token memory,
    kept apart per `cache_key`): that of :meth:`ChatRuntime.shared`."""
    return ChatRuntime.shared(engine).tokenizer


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
    """Answer a chat on `engine`'s shared chat runtime: render `messages`, generate,
    and stream the assistant's reply. The options are :meth:`ChatRuntime.complete`'s
    (tools and `tool_choice`, `response_format`, the `overflow` policy and `n_keep`,
    `cache_key`, `prediction`, the `cancelled` check).

    Raises `InvalidRequestError` (or its subclasses) for bad input before anything
    is queued.
    """
    return ChatRuntime.shared(engine).complete(
        messages,
        tools=tools,
        tool_choice=tool_choice,
        response_format=response_format,
        sampling=sampling,
        overflow=overflow,
        n_keep=n_keep,
        cache_key=cache_key,
        prediction=prediction,
        cancelled=cancelled,
    )

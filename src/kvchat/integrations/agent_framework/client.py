"""`KVChatClient`: an Agent Framework chat client on a local kvchat engine.

Agent Framework sends the whole conversation on every call (an `Agent` session keeps
it in memory); kvchat's prefix cache makes each call pay only for the messages it
adds, which the response's usage shows as `cache_read_input_token_count`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Mapping, Sequence
from datetime import datetime, timezone
from types import TracebackType
from typing import Any, ClassVar, Generic, cast

from agent_framework import (
    BaseChatClient,
    ChatMiddlewareLayer,
    ChatResponse,
    ChatResponseUpdate,
    Content,
    FunctionInvocationConfiguration,
    FunctionInvocationLayer,
    Message,
    ResponseStream,
)
from agent_framework._middleware import ChatAndFunctionMiddlewareTypes
from agent_framework.observability import ChatTelemetryLayer
from typing_extensions import Self

from kvchat.chat import ChatDelta, ChatRuntime, ChatStream
from kvchat.chat.runtime import runtime_for
from kvchat.engine import Engine, EngineSettings
from kvchat.integrations.agent_framework.messages import (
    finish_reason,
    function_call_contents,
    messages_to_dicts,
    usage_details,
)
from kvchat.integrations.agent_framework.options import KVChatOptions, KVChatRequest, request_from_options
from kvchat.integrations.engine_source import check_chat_runtime, engine_for
from kvchat.integrations.engine_source import model_id as default_model_id

if sys.version_info >= (3, 13):
    from typing import TypeVar  # pragma: no cover
else:
    from typing_extensions import TypeVar  # pragma: no cover


__all__ = ["KVChatClient", "RawKVChatClient"]

KVChatOptionsT = TypeVar(
    "KVChatOptionsT",
    bound=KVChatOptions[Any],
    default=KVChatOptions[None],
    covariant=True,
)


class RawKVChatClient(BaseChatClient[KVChatOptionsT], Generic[KVChatOptionsT]):
    """The kvchat chat client without Agent Framework's layers (no function invocation,
    middleware or telemetry): use :class:`KVChatClient`, which adds them.

    Give it a running `engine` (shared with other clients or callers; never closed
    here), or a `model` (a packaged model name or a ``.gguf`` path), in which case it
    starts its own engine with `engine_settings`; :meth:`close` (or ``with``) closes
    that one. `model_id`, what responses and telemetry name the model, defaults to
    the model's file name (or the packaged name given).

    Each call renders the history with the model's own chat template through
    `chat_runtime` (a :class:`~kvchat.chat.ChatRuntime` on the given `engine`, shared
    with other callers; default: the engine's shared one), in a worker thread (tokenizing is blocking work);
    the engine's own thread generates. Calls run concurrently and the engine batches
    them. Errors in a call's input raise `kvchat.errors.InvalidRequestError` (its
    `field` names the option or ``messages``) before anything is queued.
    """

    OTEL_PROVIDER_NAME: ClassVar[str] = "kvchat"
    INJECTABLE: ClassVar[set[str]] = {"engine"}

    def __init__(
        self,
        engine: Engine | None = None,
        *,
        model: str | os.PathLike[str] | None = None,
        engine_settings: EngineSettings | None = None,
        model_id: str | None = None,
        additional_properties: dict[str, Any] | None = None,
        chat_runtime: ChatRuntime | None = None,
        **kwargs: Any,
    ) -> None:
        """Wrap `engine`, or start an engine on `model`; exactly one must be given,
        `engine_settings` only with `model`, and `chat_runtime` only on `engine` (else
        `ValueError`). Other keyword arguments go to `BaseChatClient` (and, from
        :class:`KVChatClient`, its layers)."""
        if engine is not None and engine_settings is not None:
            raise ValueError("engine_settings apply to the engine started on a model, not to a given engine")
        check_chat_runtime(engine, chat_runtime)
        self.engine, self.owns_engine = engine_for(engine, model, engine_settings)
        self.chat_runtime = runtime_for(self.engine, chat_runtime)
        self.model: str = model_id or default_model_id(self.engine, model)
        try:
            super().__init__(additional_properties=additional_properties, **kwargs)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Close the engine if this client started it (a given engine is left open)."""
        if self.owns_engine:
            self.engine.close()

    def __enter__(self) -> Self:
        """The client itself; leaving the block calls :meth:`close`."""
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        """Close the engine if this client started it."""
        self.close()

    def service_url(self) -> str:
        """Where the model runs: in this process, on the engine's model file."""
        path = getattr(self.engine.model, "path", None)
        return f"kvchat://{os.fspath(path)}" if path else "kvchat://local"

    # -- Agent Framework hook ----------------------------------------------------------

    def _inner_get_response(
        self,
        *,
        messages: Sequence[Message],
        stream: bool,
        options: Mapping[str, Any],
        **kwargs: Any,
    ) -> Awaitable[ChatResponse] | ResponseStream[ChatResponseUpdate, ChatResponse]:
        if stream:
            return self._build_response_stream(
                self._stream_updates(messages, options), response_format=options.get("response_format")
            )
        return self._response(messages, options)

    # -- internals ---------------------------------------------------------------------

    async def _response(self, messages: Sequence[Message], options: Mapping[str, Any]) -> ChatResponse:
        chat_stream = await self._submit(messages, options)
        reply = await chat_stream.acollect()
        contents: list[Content] = []
        if reply.content:
            contents.append(Content.from_text(reply.content))
        contents.extend(function_call_contents(reply.tool_calls))
        response_id = _new_id()
        return ChatResponse(
            messages=[Message("assistant", contents, message_id=response_id)],
            response_id=response_id,
            model=self.model,
            created_at=_now(),
            finish_reason=finish_reason(reply.finish_reason),
            usage_details=usage_details(reply.usage),
            response_format=options.get("response_format"),
            additional_properties={"time_to_first_token": reply.usage.time_to_first_token},
            raw_representation=reply,
        )

    async def _stream_updates(
        self, messages: Sequence[Message], options: Mapping[str, Any]
    ) -> AsyncIterator[ChatResponseUpdate]:
        """The reply's updates. However the iteration ends (finished, the consumer
        closing the stream, the task cancelled), the engine request ends with it."""
        chat_stream = await self._submit(messages, options)
        response_id = _new_id()
        created_at = _now()
        deltas = cast(AsyncGenerator[ChatDelta, None], aiter(chat_stream))
        try:
            async with contextlib.aclosing(deltas):
                async for delta in deltas:
                    yield self._update(delta, response_id, created_at)
        finally:
            chat_stream.cancel()  # no effect once the reply is complete

    def _update(self, delta: ChatDelta, response_id: str, created_at: str) -> ChatResponseUpdate:
        contents: list[Content] = []
        if delta.content:
            contents.append(Content.from_text(delta.content))
        contents.extend(function_call_contents(delta.tool_calls))
        properties = None
        if delta.usage is not None:
            contents.append(Content.from_usage(usage_details(delta.usage)))
            properties = {"time_to_first_token": delta.usage.time_to_first_token}
        return ChatResponseUpdate(
            contents=contents,
            role="assistant",
            response_id=response_id,
            message_id=response_id,
            model=self.model,
            created_at=created_at,
            finish_reason=finish_reason(delta.finish_reason),
            additional_properties=properties,
            raw_representation=delta,
        )

    async def _submit(self, messages: Sequence[Message], options: Mapping[str, Any]) -> ChatStream:
        """Check the call and queue it. Rendering and tokenizing a long history is
        blocking work, so it runs in a worker thread; if the caller is cancelled
        meanwhile, the request is cancelled as soon as it is queued."""
        request = request_from_options(options, model_id=self.model, n_vocab=self.engine.model.n_vocab)
        history = messages_to_dicts(messages, request.instructions)
        task = asyncio.ensure_future(asyncio.to_thread(self._complete, history, request))
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            task.add_done_callback(_cancel_queued)
            raise

    def _complete(self, history: list[dict[str, Any]], request: KVChatRequest) -> ChatStream:
        return self.chat_runtime.complete(
            history,
            tools=request.tools,
            tool_choice=request.tool_choice,
            response_format=request.response_format,
            sampling=request.sampling,
            overflow=request.overflow,
            cache_key=request.cache_key,
        )


class KVChatClient(
    FunctionInvocationLayer[KVChatOptionsT],
    ChatMiddlewareLayer[KVChatOptionsT],
    ChatTelemetryLayer[KVChatOptionsT],
    RawKVChatClient[KVChatOptionsT],
    Generic[KVChatOptionsT],
):
    """Agent Framework chat client on a local GGUF model, with the framework's
    function invocation, middleware and telemetry layers (as its own clients have).

    ``KVChatClient(engine)`` or ``KVChatClient(model="qwen2.5-coder-0.5b-instruct")``;
    see :class:`RawKVChatClient` for the engine and model arguments, and
    :class:`~kvchat.integrations.agent_framework.KVChatOptions` for the options.

    - ``get_response(messages)`` and ``get_response(messages, stream=True)``;
    - tools: Python functions (the ``@tool`` decorator, `FunctionTool`) are called by
      the function-invocation layer, with `tool_choice` ``"auto"``, ``"required"``
      (one forced call, by grammar), ``"none"`` or a named function;
      ``function_invocation_configuration={"max_iterations": 1}`` asks for the answer
      after one round of calls (small models tend to call again and again);
    - `response_format`: a Pydantic type or a JSON schema, enforced by grammar
      (``response.value`` parses it);
    - usage: input, output and total tokens, and the prompt tokens served from the
      KV cache as `cache_read_input_token_count`;
    - ``client.as_agent(instructions=..., tools=[...])`` for an `Agent`.
    """

    def __init__(
        self,
        engine: Engine | None = None,
        *,
        model: str | os.PathLike[str] | None = None,
        engine_settings: EngineSettings | None = None,
        model_id: str | None = None,
        middleware: Sequence[ChatAndFunctionMiddlewareTypes] | None = None,
        function_invocation_configuration: FunctionInvocationConfiguration | None = None,
        additional_properties: dict[str, Any] | None = None,
        chat_runtime: ChatRuntime | None = None,
    ) -> None:
        """Wrap `engine`, or start an engine on `model` (exactly one); `middleware`
        and `function_invocation_configuration` configure the framework's layers;
        `chat_runtime` as for :class:`RawKVChatClient`."""
        super().__init__(
            engine=engine,
            model=model,
            engine_settings=engine_settings,
            model_id=model_id,
            middleware=middleware,
            function_invocation_configuration=function_invocation_configuration,
            additional_properties=additional_properties,
            chat_runtime=chat_runtime,
        )


def _cancel_queued(task: asyncio.Future[ChatStream]) -> None:
    """Cancel the request a cancelled caller queued (a failed one queued nothing)."""
    if not task.cancelled() and task.exception() is None:
        task.result().cancel()


def _new_id() -> str:
    return f"kvchat-{uuid.uuid4().hex}"


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")

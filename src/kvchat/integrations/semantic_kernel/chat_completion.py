"""`KVChatCompletion`: a Semantic Kernel chat completion service on a local kvchat engine.

Semantic Kernel sends the whole chat history on every call; kvchat's prefix cache
makes each call pay only for the messages it adds (see ``metadata["usage"]``).
"""

import asyncio
import logging
import os
from collections.abc import AsyncGenerator, Callable
from typing import Any, ClassVar

from pydantic import PrivateAttr
from semantic_kernel.connectors.ai.chat_completion_client_base import ChatCompletionClientBase
from semantic_kernel.connectors.ai.function_call_choice_configuration import FunctionCallChoiceConfiguration
from semantic_kernel.connectors.ai.function_calling_utils import kernel_function_metadata_to_function_call_format
from semantic_kernel.connectors.ai.function_choice_type import FunctionChoiceType
from semantic_kernel.connectors.ai.prompt_execution_settings import PromptExecutionSettings
from semantic_kernel.contents import (
    ChatHistory,
    ChatMessageContent,
    StreamingChatMessageContent,
    StreamingTextContent,
    TextContent,
)
from semantic_kernel.contents.utils.author_role import AuthorRole

from kvchat.chat import ChatRuntime, ChatStream
from kvchat.chat.runtime import runtime_for
from kvchat.engine import Engine, EngineSettings
from kvchat.integrations.engine_source import check_chat_runtime
from kvchat.integrations.semantic_kernel.engine_service import EngineService
from kvchat.integrations.semantic_kernel.messages import (
    finish_reason,
    function_call_contents,
    history_to_messages,
    usage_metadata,
)
from kvchat.integrations.semantic_kernel.settings import KVChatPromptExecutionSettings

logger = logging.getLogger(__name__)

__all__ = ["KVChatCompletion"]

# Pydantic model: annotations stay real at runtime (no `from __future__ import annotations`).


class KVChatCompletion(EngineService, ChatCompletionClientBase):
    """Chat completion by a local GGUF model through a :class:`~kvchat.chat.ChatRuntime`.

    Constructed like :class:`EngineService`: ``KVChatCompletion(engine)`` or
    ``KVChatCompletion(model="qwen2.5-coder-0.5b-instruct")``; with a given
    `engine`, `chat_runtime` may name the runtime (tokenizer and generated-token
    memory) to share with other callers (default: the engine's shared one).

    Function calling runs through Semantic Kernel's own loop: a
    `FunctionChoiceBehavior` writes the kernel's functions into the settings'
    `tools` and `tool_choice` (``auto``, ``required``, ``none``), and the model's
    tool calls come back as `FunctionCallContent` items with unique ids.
    Requests run concurrently; the engine batches them.
    """

    SUPPORTS_FUNCTION_CALLING: ClassVar[bool] = True
    MODEL_PROVIDER_NAME: ClassVar[str] = "kvchat"

    _chat_runtime: ChatRuntime = PrivateAttr()

    def __init__(
        self,
        engine: Engine | None = None,
        *,
        model: str | os.PathLike[str] | None = None,
        engine_settings: EngineSettings | None = None,
        ai_model_id: str | None = None,
        service_id: str | None = None,
        chat_runtime: ChatRuntime | None = None,
    ) -> None:
        """As :class:`EngineService`'s; `chat_runtime` must run on `engine` (else `ValueError`)."""
        check_chat_runtime(engine, chat_runtime)
        super().__init__(
            engine, model=model, engine_settings=engine_settings, ai_model_id=ai_model_id, service_id=service_id
        )
        self._chat_runtime = runtime_for(self.engine, chat_runtime)

    @property
    def chat_runtime(self) -> ChatRuntime:
        """The chat runtime this service's chats run on."""
        return self._chat_runtime

    def get_prompt_execution_settings_class(self) -> type[PromptExecutionSettings]:
        """Settings type of this service: :class:`KVChatPromptExecutionSettings`."""
        return KVChatPromptExecutionSettings

    # -- Semantic Kernel hooks -------------------------------------------------------

    async def _inner_get_chat_message_contents(
        self, chat_history: ChatHistory, settings: PromptExecutionSettings
    ) -> list[ChatMessageContent]:
        settings = self._kv_settings(settings)
        stream = await self._start(chat_history, settings)
        reply = await stream.acollect()
        items: list[Any] = function_call_contents(reply.tool_calls)
        if reply.content:
            items.append(TextContent(text=reply.content, ai_model_id=self.ai_model_id))
        return [
            ChatMessageContent(
                role=AuthorRole.ASSISTANT,
                items=items,
                ai_model_id=self.ai_model_id,
                metadata={"usage": usage_metadata(reply.usage)},
                finish_reason=finish_reason(reply.finish_reason),
                inner_content=reply,
            )
        ]

    async def _inner_get_streaming_chat_message_contents(
        self,
        chat_history: ChatHistory,
        settings: PromptExecutionSettings,
        function_invoke_attempt: int = 0,
    ) -> AsyncGenerator[list[StreamingChatMessageContent], Any]:
        settings = self._kv_settings(settings)
        stream = await self._start(chat_history, settings)
        n_calls = 0
        async for delta in stream:
            items: list[Any] = []
            if delta.content:
                items.append(StreamingTextContent(choice_index=0, text=delta.content, ai_model_id=self.ai_model_id))
            if delta.tool_calls:
                items.extend(function_call_contents(delta.tool_calls, start_index=n_calls))
                n_calls += len(delta.tool_calls)
            metadata = {"usage": usage_metadata(delta.usage)} if delta.usage is not None else {}
            yield [
                StreamingChatMessageContent(
                    role=AuthorRole.ASSISTANT,
                    choice_index=0,
                    items=items,
                    ai_model_id=self.ai_model_id,
                    metadata=metadata,
                    finish_reason=finish_reason(delta.finish_reason),
                    function_invoke_attempt=function_invoke_attempt,
                    inner_content=delta,
                )
            ]

    def _update_function_choice_settings_callback(
        self,
    ) -> Callable[[FunctionCallChoiceConfiguration, PromptExecutionSettings, FunctionChoiceType], None]:
        return _write_tools

    def _reset_function_choice_settings(self, settings: PromptExecutionSettings) -> None:
        """Semantic Kernel's last call after its auto-invoke attempts: no more calls.

        The tools stay, with `tool_choice` "none" (OpenAI's connector drops them):
        that call follows tool results, so the chat runtime keeps the tools in the prompt
        and asks for the answer (`kvchat.chat.tool_round`), continuing the cached
        prompt of the call instead of re-reading the conversation without tools.
        """
        if hasattr(settings, "tool_choice"):
            settings.tool_choice = "none" if getattr(settings, "tools", None) else None

    # -- internals -------------------------------------------------------------------

    def _kv_settings(self, settings: PromptExecutionSettings) -> KVChatPromptExecutionSettings:
        if not isinstance(settings, KVChatPromptExecutionSettings):
            settings = self.get_prompt_execution_settings_from_settings(settings)
        assert isinstance(settings, KVChatPromptExecutionSettings)  # nosec
        return settings

    async def _start(self, chat_history: ChatHistory, settings: KVChatPromptExecutionSettings) -> ChatStream:
        """Submit the request; tokenizing a long history is blocking work, so it runs
        in a worker thread, and the engine's own thread does the decoding."""
        messages = history_to_messages(chat_history)
        sampling = settings.to_sampling_params()
        return await asyncio.to_thread(
            self.chat_runtime.complete,
            messages,
            tools=settings.tools or None,
            tool_choice=settings.tool_choice,
            response_format=settings.response_format,
            sampling=sampling,
            overflow=settings.overflow or "error",
            cache_key=settings.cache_key,
        )


def _write_tools(
    configuration: FunctionCallChoiceConfiguration,
    settings: PromptExecutionSettings,
    choice: FunctionChoiceType,
) -> None:
    """Write the kernel's available functions into `settings` as OpenAI tools (as
    Semantic Kernel's `update_settings_from_function_call_configuration` does, but
    storing the choice as its plain string)."""
    if configuration.available_functions and hasattr(settings, "tools") and hasattr(settings, "tool_choice"):
        settings.tools = [
            kernel_function_metadata_to_function_call_format(f) for f in configuration.available_functions
        ]
        settings.tool_choice = choice.value

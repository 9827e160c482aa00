"""`KVTextCompletion`: a Semantic Kernel text completion service on a local kvchat engine.

The prompt is plain text continued by the model (no chat template), through
:meth:`kvchat.engine.Engine.generate`; repeated prompt prefixes are served from
the engine's prefix cache like chat histories are.
"""

import asyncio
import logging
from collections.abc import AsyncGenerator
from typing import Any

from pydantic import Field
from semantic_kernel.connectors.ai.prompt_execution_settings import PromptExecutionSettings
from semantic_kernel.connectors.ai.text_completion_client_base import TextCompletionClientBase
from semantic_kernel.contents import StreamingTextContent, TextContent

from kvchat.engine import Stream
from kvchat.integrations.semantic_kernel.engine_service import EngineService
from kvchat.integrations.semantic_kernel.messages import usage_metadata
from kvchat.integrations.semantic_kernel.settings import KVTextPromptExecutionSettings

logger = logging.getLogger(__name__)

__all__ = ["KVTextCompletion"]

# Pydantic model: annotations stay real at runtime (no `from __future__ import annotations`).


class KVTextCompletion(EngineService, TextCompletionClientBase):
    """Text completion by a local GGUF model: the prompt is tokenized with the
    model's BOS and plain text (special-token markup in it is not parsed unless
    `parse_special` is set), then continued.

    Constructed like :class:`EngineService`: ``KVTextCompletion(engine)`` or
    ``KVTextCompletion(model=...)``. ``metadata["usage"]`` holds the token counts.
    """

    parse_special: bool = Field(default=False, exclude=True)

    def get_prompt_execution_settings_class(self) -> type[PromptExecutionSettings]:
        """Settings type of this service: :class:`KVTextPromptExecutionSettings`."""
        return KVTextPromptExecutionSettings

    async def _inner_get_text_contents(self, prompt: str, settings: PromptExecutionSettings) -> list[TextContent]:
        completion = await (await self._start(prompt, settings)).acollect()
        return [
            TextContent(
                text=completion.text,
                ai_model_id=self.ai_model_id,
                metadata={"usage": usage_metadata(completion.usage), "finish_reason": completion.usage.finish_reason},
                inner_content=completion,
            )
        ]

    async def _inner_get_streaming_text_contents(
        self, prompt: str, settings: PromptExecutionSettings
    ) -> AsyncGenerator[list[StreamingTextContent], Any]:
        stream = await self._start(prompt, settings)
        async for chunk in stream:
            if not chunk.text and chunk.usage is None:
                continue
            metadata: dict[str, Any] = {}
            if chunk.usage is not None:
                metadata = {"usage": usage_metadata(chunk.usage), "finish_reason": chunk.usage.finish_reason}
            yield [
                StreamingTextContent(
                    choice_index=0,
                    text=chunk.text,
                    ai_model_id=self.ai_model_id,
                    metadata=metadata,
                    inner_content=chunk,
                )
            ]

    async def _start(self, prompt: str, settings: PromptExecutionSettings) -> Stream:
        """Submit the request; tokenizing runs in a worker thread, off the event loop."""
        if not isinstance(settings, KVTextPromptExecutionSettings):
            settings = self.get_prompt_execution_settings_from_settings(settings)
        assert isinstance(settings, KVTextPromptExecutionSettings)  # nosec
        return await asyncio.to_thread(
            self.engine.generate,
            prompt,
            settings.to_sampling_params(),
            parse_special=self.parse_special,
            cache_key=settings.cache_key,
        )

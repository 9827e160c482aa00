"""Semantic Kernel services backed by a local kvchat engine.

Needs the ``semantic-kernel`` extra (``pip install kvchat[semantic-kernel]``).

- :class:`KVChatCompletion`: chat completion, streaming, and function calling
  through Semantic Kernel's `FunctionChoiceBehavior` loop;
- :class:`KVTextCompletion`: plain text completion (no chat template);
- :class:`KVTextEmbedding`: text embeddings (its own embedding context on the
  model's shared weights);
- :class:`KVChatPromptExecutionSettings`, :class:`KVTextPromptExecutionSettings`:
  their options;
- :class:`EngineService`: what both share (a given or an owned engine).
"""

from kvchat.integrations.semantic_kernel.chat_completion import KVChatCompletion
from kvchat.integrations.semantic_kernel.engine_service import EngineService
from kvchat.integrations.semantic_kernel.messages import history_to_messages
from kvchat.integrations.semantic_kernel.settings import (
    KVChatPromptExecutionSettings,
    KVTextPromptExecutionSettings,
)
from kvchat.integrations.semantic_kernel.text_completion import KVTextCompletion
from kvchat.integrations.semantic_kernel.text_embedding import KVTextEmbedding

__all__ = [
    "EngineService",
    "KVChatCompletion",
    "KVChatPromptExecutionSettings",
    "KVTextCompletion",
    "KVTextEmbedding",
    "KVTextPromptExecutionSettings",
    "history_to_messages",
]

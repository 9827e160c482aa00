"""kvchat: local language models with a content-keyed KV cache and continuous batching.

>>> from kvchat import Engine, SamplingParams, models
>>> with Engine(models.resolve("gemma-3-270m")) as engine:
...     print(engine.generate("The capital of France is", SamplingParams(max_tokens=8)).text())
"""

import logging

from kvchat.chat.session import ChatSession
from kvchat.engine import (
    GREEDY,
    Chunk,
    Completion,
    Conversation,
    Engine,
    EngineSettings,
    EngineStats,
    Grammar,
    SamplingParams,
    Stream,
    Usage,
)
from kvchat.errors import (
    BackendError,
    ContextOverflowError,
    ConversationFileError,
    DecodeError,
    EngineClosedError,
    GrammarError,
    InvalidRequestError,
    KVChatError,
    ModelLoadError,
    ModelNotFoundError,
)

__version__ = "0.1.0"

# A library logs, the application decides what to show (llama.cpp's own log
# lines arrive on "kvchat.llama.cpp").
logging.getLogger("kvchat").addHandler(logging.NullHandler())

__all__ = [
    "GREEDY",
    "BackendError",
    "ChatSession",
    "Chunk",
    "Completion",
    "ContextOverflowError",
    "Conversation",
    "ConversationFileError",
    "DecodeError",
    "Engine",
    "EngineClosedError",
    "EngineSettings",
    "EngineStats",
    "Grammar",
    "GrammarError",
    "InvalidRequestError",
    "KVChatError",
    "ModelLoadError",
    "ModelNotFoundError",
    "SamplingParams",
    "Stream",
    "Usage",
    "__version__",
]

"""Public errors of kvchat.

Every error kvchat raises on purpose is a subclass of :class:`KVChatError`, so a
caller can catch them all in one place, and each layer above maps them to its
own surface (the HTTP server turns them into OpenAI-shaped JSON errors).

The hierarchy::

    KVChatError
    ├── ModelLoadError            a model file is missing, unreadable or not GGUF
    │   └── ModelNotFoundError    a name or path that resolves to no model file
    ├── InvalidRequestError       a request's own values are wrong (has `field`)
    │   ├── ContextOverflowError  prompt + max_tokens exceed the context (has the numbers)
    │   ├── GrammarError          the output's grammar failed while decoding (its request ends)
    │   └── ConversationFileError a saved conversation is damaged or from another model/layout
    ├── EngineClosedError         the engine was closed before or during the call
    └── BackendError              llama.cpp itself failed (decode, KV or state call)
        └── DecodeError           llama_decode returned an error code (has `code`)
"""

from __future__ import annotations

import os

__all__ = [
    "KVChatError",
    "ModelLoadError",
    "ModelNotFoundError",
    "InvalidRequestError",
    "ContextOverflowError",
    "GrammarError",
    "ConversationFileError",
    "EngineClosedError",
    "BackendError",
    "DecodeError",
]


class KVChatError(Exception):
    """Base class of every error that kvchat raises on purpose."""


class ModelLoadError(KVChatError):
    """A model file could not be loaded: missing, unreadable or not a GGUF model."""

    def __init__(self, message: str, *, path: str | os.PathLike[str] | None = None) -> None:
        super().__init__(message)
        self.path = None if path is None else os.fspath(path)


class ModelNotFoundError(ModelLoadError):
    """A model name or path resolves to no usable model file."""


class InvalidRequestError(KVChatError, ValueError):
    """A request carries a value that cannot be served; `field` names it."""

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class ContextOverflowError(InvalidRequestError):
    """The prompt plus the tokens to generate do not fit in one sequence's context."""

    def __init__(self, *, prompt_tokens: int, max_tokens: int, context_limit: int) -> None:
        super().__init__(
            f"prompt ({prompt_tokens} tokens) plus max_tokens ({max_tokens}) = "
            f"{prompt_tokens + max_tokens} tokens exceed the context limit of "
            f"{context_limit} tokens per sequence",
            field="messages",
        )
        self.prompt_tokens = prompt_tokens
        self.max_tokens = max_tokens
        self.context_limit = context_limit


class GrammarError(InvalidRequestError):
    """A request's grammar failed while its output was decoded: no token could
    continue it, or its matcher reached one of its bounds. The request ends with
    this error; the engine and every other request go on."""


class ConversationFileError(InvalidRequestError):
    """A conversation file is missing, damaged, or from another model or KV layout."""


class EngineClosedError(KVChatError, RuntimeError):
    """The engine is closed, or was closed while the call waited."""


class BackendError(KVChatError, RuntimeError):
    """llama.cpp reported a failure that is not the caller's fault."""


class DecodeError(BackendError):
    """`llama_decode` returned a non-zero code.

    Codes: 1 = no KV slot for the batch, 2 = aborted, -1 = invalid batch,
    below -1 = fatal error inside llama.cpp.
    """

    def __init__(self, code: int) -> None:
        meaning = {1: "no KV cache slot for the batch", 2: "aborted", -1: "invalid batch"}.get(code, "fatal error")
        super().__init__(f"llama_decode failed with code {code} ({meaning})")
        self.code = code

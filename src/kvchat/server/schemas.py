"""Request bodies of the OpenAI-compatible API, as pydantic models.

They follow OpenAI's schemas. Fields that OpenAI defines and kvchat ignores
(``logprobs``, ``metadata``, ``store``, ``parallel_tool_calls`` ...) are accepted
and dropped (``extra="allow"``), so official clients never fail on them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal, cast

from pydantic import BaseModel, ConfigDict, Field

from kvchat.errors import InvalidRequestError


class ChatMessage(BaseModel):
    """One message of the history. `content` is a string, a list of content parts, or None."""

    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")

    include_usage: bool = False


class SamplingFields(BaseModel):
    """Generation options shared by chat and text completions."""

    model_config = ConfigDict(extra="allow")

    model: str
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    seed: int | None = None
    stop: str | list[str] | None = None
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None
    n: int | None = None
    user: str | None = None


class ChatCompletionRequest(SamplingFields):
    """``POST /v1/chat/completions``."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    response_format: dict[str, Any] | None = None
    prediction: dict[str, Any] | None = None

    def history(self) -> list[dict[str, Any]]:
        """The messages as plain dicts, without the fields the client left out."""
        return [m.model_dump(exclude_none=True) for m in self.messages]

    def prediction_text(self) -> str | None:
        """The text of `prediction` (see :func:`prediction_text`); None without one."""
        return None if self.prediction is None else prediction_text(self.prediction)


def prediction_text(prediction: Mapping[str, Any]) -> str:
    """The text of OpenAI's predicted output, ``{"type": "content", "content": ...}``,
    whose content is a string or a list of ``{"type": "text", "text": ...}`` parts
    (joined). Any other shape raises `InvalidRequestError` (field ``prediction``)."""
    kind = prediction.get("type")
    if kind != "content":
        shown = repr(kind)[:40]
        raise InvalidRequestError(f"prediction type must be 'content', not {shown}", field="prediction")
    content = prediction.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(_is_text_part(part) for part in content):
        return "".join(part["text"] for part in content)
    raise InvalidRequestError(
        "prediction content must be a string or a list of {'type': 'text', 'text': ...} parts", field="prediction"
    )


def _is_text_part(part: object) -> bool:
    return isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)


class CompletionRequest(SamplingFields):
    """``POST /v1/completions``: `prompt` is a text, a list of texts, token ids, or lists of token ids."""

    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(default=16, ge=1)
    echo: bool = False
    suffix: str | None = None
    logprobs: int | None = None
    best_of: int | None = None

    def prompts(self) -> list[str | list[int]]:
        """The prompts, one per choice (a bare list of ints is one prompt of token ids)."""
        if isinstance(self.prompt, str):
            return [self.prompt]
        # `all(isinstance(...))` does not narrow the union for the type checker: say what it proved.
        if self.prompt and all(isinstance(item, int) for item in self.prompt):
            return [cast("list[int]", list(self.prompt))]
        return cast("list[str | list[int]]", list(self.prompt))


class EmbeddingRequest(BaseModel):
    """``POST /v1/embeddings``: `input` is a text or a list of texts."""

    model_config = ConfigDict(extra="allow")

    model: str
    input: str | list[str]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    user: str | None = None

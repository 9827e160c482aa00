"""Prompt execution settings of the kvchat Semantic Kernel services.

Pydantic models (Semantic Kernel's own base), so the annotations here must stay
real at runtime: this module does not use ``from __future__ import annotations``.
"""

import logging
from typing import Annotated, Any, Literal

from pydantic import Field
from semantic_kernel.connectors.ai.prompt_execution_settings import PromptExecutionSettings

from kvchat.engine import SamplingParams

logger = logging.getLogger(__name__)

__all__ = ["KVChatPromptExecutionSettings", "KVTextPromptExecutionSettings"]

# Settings fields that map one to one onto `SamplingParams` fields.
_SAMPLING_FIELDS = (
    "max_tokens",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "repeat_penalty",
    "presence_penalty",
    "frequency_penalty",
    "seed",
)


class KVTextPromptExecutionSettings(PromptExecutionSettings):
    """Sampling options of one kvchat request. A field left at None takes the
    default of :class:`kvchat.engine.SamplingParams`; values are checked by it, so
    a bad one raises `kvchat.errors.InvalidRequestError` when the request is made.

    `stop` may be one string or a list. `cache_key` keeps tenants' cached prefixes
    apart (see :func:`kvchat.chat.complete`).
    """

    max_tokens: Annotated[int | None, Field(gt=0)] = None
    temperature: Annotated[float | None, Field(ge=0.0)] = None
    top_p: Annotated[float | None, Field(gt=0.0, le=1.0)] = None
    top_k: Annotated[int | None, Field(ge=0)] = None
    min_p: Annotated[float | None, Field(ge=0.0, le=1.0)] = None
    repeat_penalty: Annotated[float | None, Field(gt=0.0)] = None
    presence_penalty: Annotated[float | None, Field(ge=-2.0, le=2.0)] = None
    frequency_penalty: Annotated[float | None, Field(ge=-2.0, le=2.0)] = None
    seed: int | None = None
    stop: str | list[str] | None = None
    cache_key: str | None = None

    def to_sampling_params(self) -> SamplingParams:
        """The :class:`SamplingParams` these settings describe."""
        values: dict[str, Any] = {
            name: getattr(self, name) for name in _SAMPLING_FIELDS if getattr(self, name) is not None
        }
        if self.stop is not None:
            values["stop"] = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)
        return SamplingParams(**values)


class KVChatPromptExecutionSettings(KVTextPromptExecutionSettings):
    """Options of one kvchat chat request: sampling, plus `response_format`
    (``{"type": "json_object"}`` or ``{"type": "json_schema", ...}``), the
    context-`overflow` policy of :func:`kvchat.chat.complete`, and `tools` /
    `tool_choice`, which Semantic Kernel's function-choice behaviour fills in:
    do not set those two by hand when a `function_choice_behavior` is given.
    """

    response_format: dict[str, Any] | None = None
    overflow: Literal["error", "truncate_oldest", "shift"] | None = None
    tools: Annotated[
        list[dict[str, Any]] | None,
        Field(description="Set by the service from the function choice configuration."),
    ] = None
    tool_choice: Annotated[
        str | dict[str, Any] | None,
        Field(description="Set by the service from the function choice configuration."),
    ] = None

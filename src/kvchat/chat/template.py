"""`ChatTemplate`: the model's own Jinja chat template, rendered in a sandbox."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from kvchat.errors import InvalidRequestError

logger = logging.getLogger("kvchat.chat")

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
"""Fallback for models whose GGUF carries no template."""


class TemplateRenderError(InvalidRequestError):
    """The chat template refused the messages or failed to render them."""


def _raise_exception(message: str) -> None:
    raise TemplateRenderError(f"chat template error: {message}", field="messages")


def _tojson(value: Any, indent: int | None = None, ensure_ascii: bool = False, sort_keys: bool = False) -> str:
    # Model templates expect plain JSON, not jinja2's HTML-escaped variant.
    return json.dumps(value, indent=indent, ensure_ascii=ensure_ascii, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class ChatTemplate:
    """A chat template rendered with jinja2's immutable sandbox.

    Templates come from model files, so they are untrusted: the sandbox refuses
    access to Python internals (such an attempt raises `TemplateRenderError`).
    """

    def __init__(self, source: str, *, bos_token: str = "", eos_token: str = "") -> None:
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
        env.filters["tojson"] = _tojson
        env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now)
        try:
            self._template = env.from_string(source)
        except TemplateError as exc:
            raise TemplateRenderError(f"the chat template does not compile: {exc}", field="chat_template") from exc
        self.source = source
        self.bos_token = bos_token
        self.eos_token = eos_token

    @classmethod
    def for_model(cls, model: Any) -> ChatTemplate:
        """The template in a model's GGUF metadata, or ChatML (with a log line) if it has none."""
        source = model.chat_template
        if not source:
            logger.info("%s has no chat template; using ChatML", model.path)
            source = CHATML_TEMPLATE
        bos = model.token_to_bytes(model.bos_token, special=True).decode("utf-8", "replace") if model.bos_token >= 0 else ""
        eos = model.token_to_bytes(model.eos_token, special=True).decode("utf-8", "replace") if model.eos_token >= 0 else ""
        return cls(source, bos_token=bos, eos_token=eos)

    def render(
        self,
        messages: Sequence[Mapping[str, Any]],
        tools: Sequence[Mapping[str, Any]] | None = None,
        add_generation_prompt: bool = True,
    ) -> str:
        """Render messages (and tool definitions) to the prompt text the model expects."""
        try:
            return self._template.render(
                messages=[dict(m) for m in messages],
                tools=list(tools) if tools else None,
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token,
                eos_token=self.eos_token,
            )
        except TemplateRenderError:
            raise
        except (TemplateError, TypeError, ValueError, KeyError, AttributeError) as exc:
            raise TemplateRenderError(f"the chat template failed to render: {exc}", field="messages") from exc

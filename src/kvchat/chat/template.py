"""`ChatTemplate`: the model's own Jinja chat template, rendered in a sandbox.

Templates come from model files, so they are untrusted code. They run in
jinja2's immutable sandbox, made stricter here: touching an unsafe attribute
(``''.__class__``, ``cycler.__init__.__globals__``, ``self.__dict__``) raises at
once instead of rendering an empty string, ``import``/``include``/``extends``
find no loader, and what a template may allocate is bounded
(:mod:`kvchat.chat.template_limits`: ``*``, ``**``, padding and format widths, joining,
concatenating, ``tojson`` and the rendered prompt). Every failure surfaces as
:class:`TemplateRenderError`.
"""

from __future__ import annotations

import json
import logging
import operator
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any

from jinja2 import nodes
from jinja2.exceptions import SecurityError, TemplateError
from jinja2.ext import Extension
from jinja2.parser import Parser
from jinja2.sandbox import ImmutableSandboxedEnvironment

from kvchat.chat.template_limits import (
    BOUNDED_FILTERS,
    MAX_POWER_EXPONENT,
    MAX_REPEAT_LENGTH,
    BoundedCodeGenerator,
    bounded_str_format,
    check_length,
    check_percent_format,
    check_str_call,
    joined,
)
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
    """The chat template refused the messages, failed to render them, or tried
    to reach Python internals (which the sandbox refuses)."""


def _raise_exception(message: str) -> None:
    raise TemplateRenderError(f"chat template error: {message}", field="messages")


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class _GenerationBlock(Extension):
    """``{% generation %}...{% endgeneration %}`` (Hugging Face's assistant-mask
    marker): renders its body unchanged."""

    tags = {"generation"}  # noqa: RUF012 - jinja2 declares Extension.tags a plain set, not a ClassVar

    def parse(self, parser: Parser) -> nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.Scope(body, lineno=lineno)


class _StrictSandbox(ImmutableSandboxedEnvironment):
    """The immutable sandbox, failing loudly on unsafe access and bounding the
    operations that can allocate without limit (see `kvchat.chat.template_limits`)."""

    intercepted_binops = frozenset({"*", "**", "+", "%"})
    code_generator_class = BoundedCodeGenerator

    def unsafe_undefined(self, obj: Any, attribute: str) -> Any:
        raise SecurityError(f"access to attribute {attribute!r} of {type(obj).__name__!r} object is unsafe")

    def getattr(self, obj: Any, attribute: str) -> Any:
        # The base class answers "undefined" for a missing private attribute
        # (``range.__self__``); any reach for one is refused, found or not.
        if attribute.startswith("_"):
            return self.unsafe_undefined(obj, attribute)
        return super().getattr(obj, attribute)

    def call_binop(self, context: Any, op: str, left: Any, right: Any) -> Any:
        if op == "**":
            if isinstance(right, int) and abs(right) > MAX_POWER_EXPONENT:
                raise SecurityError(f"exponent {right} is too large for a chat template")
            return operator.pow(left, right)
        if op == "%":
            if isinstance(left, str):
                check_percent_format(left, right)
            return operator.mod(left, right)
        if op == "+":
            if isinstance(left, (str, list, tuple)) and isinstance(right, (str, list, tuple)):
                check_length(len(left) + len(right), "a sum")
            return operator.add(left, right)
        for seq, count in ((left, right), (right, left)):
            if isinstance(seq, (str, list, tuple)) and isinstance(count, int) and len(seq) * count > MAX_REPEAT_LENGTH:
                raise SecurityError("a chat template tried to build a value that is too large")
        return operator.mul(left, right)

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:
        text, method = getattr(__obj, "__self__", None), getattr(__obj, "__name__", None)
        if isinstance(text, str) and isinstance(method, str):
            if method == "join" and len(args) == 1 and not kwargs:
                items = list(args[0])
                if all(isinstance(item, str) for item in items):
                    return joined(text, items, "str.join text")
                args = (items,)  # str.join refuses them itself
            check_str_call(method, text, args, kwargs)
        return super().call(__context, __obj, *args, **kwargs)

    def wrap_str_format(self, value: Any) -> Callable[..., str] | None:
        if super().wrap_str_format(value) is None or type(value.__self__) is not str:
            return super().wrap_str_format(value)  # not str.format, or Markup's (not used here)
        return bounded_str_format(self, value)

    def concat_bounded(self, values: Iterable[Any]) -> str:
        """``~``: the values as text, joined, within `MAX_RENDER_LENGTH`."""
        return joined("", values, "concatenated text")


# A tool call whose arguments the capability probe looks for in the output.
_PROBE_NEEDLE = "argument_needle"
_PROBE_ARGUMENTS = {_PROBE_NEEDLE: "print('Hello, World!')"}


class ChatTemplate:
    """A chat template rendered with a strict immutable sandbox.

    Build it from a model with :meth:`for_model` (the GGUF's
    ``tokenizer.chat_template`` and its BOS/EOS token texts) or from source.
    Templates get the helpers Hugging Face templates expect: ``raise_exception``,
    ``tojson`` (plain JSON, ``ensure_ascii=False``), ``strftime_now``, loop
    controls (``break``/``continue``) and the ``generation`` block.
    """

    def __init__(self, source: str, *, bos_token: str = "", eos_token: str = "") -> None:
        env = _StrictSandbox(
            trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols", _GenerationBlock]
        )
        env.filters.update(BOUNDED_FILTERS)
        env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now)
        del env.globals["lipsum"]  # pages of lorem ipsum: no chat template needs them
        try:
            self._template = env.from_string(source)
        except TemplateError as exc:
            raise TemplateRenderError(f"the chat template does not compile: {exc}", field="chat_template") from exc
        self.source = source
        self.bos_token = bos_token
        self.eos_token = eos_token
        self._object_arguments: bool | None = None

    @classmethod
    def for_model(cls, model: Any) -> ChatTemplate:
        """The template in a model's GGUF metadata, or ChatML (with a log line) if it has none."""
        source = model.chat_template
        if not source:
            logger.info("%s has no chat template; using ChatML", model.path)
            source = CHATML_TEMPLATE
        return cls(source, bos_token=_token_text(model, model.bos_token), eos_token=_token_text(model, model.eos_token))

    # -- rendering ------------------------------------------------------------------

    def render(
        self,
        messages: Sequence[Mapping[str, Any]],
        tools: Sequence[Mapping[str, Any]] | None = None,
        add_generation_prompt: bool = True,
    ) -> str:
        """Render messages (and tool definitions) to the prompt text the model expects.

        Messages are first passed through :meth:`normalize`; the caller's objects
        are never changed. Raises `TemplateRenderError` for anything that fails.
        """
        return self._render(self.normalize(messages), tools, add_generation_prompt)

    def normalize(self, messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
        """Copies of `messages` in the shape model templates expect.

        - content given as OpenAI content parts (``[{"type": "text", "text": ...}]``)
          becomes one string, the texts joined with newlines; other part types
          raise `TemplateRenderError` (the models here read text only);
        - ``tool_calls[*].function.arguments`` given as a JSON string becomes a
          mapping when this template renders arguments with ``tojson`` (as Qwen's
          does), so that they are not JSON-encoded twice; a template that prints
          strings as they are gets them unchanged.

        Idempotent: normalizing normalized messages changes nothing.
        """
        if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
            raise TemplateRenderError("messages must be a list of message objects", field="messages")
        out: list[dict[str, Any]] = []
        for index, message in enumerate(messages):
            if not isinstance(message, Mapping):
                raise TemplateRenderError(f"messages[{index}] is not an object", field="messages")
            copy = dict(message)
            copy["content"] = _content_text(copy.get("content"), index)
            calls = copy.get("tool_calls")
            if calls and (isinstance(calls, (str, bytes)) or not isinstance(calls, Sequence)):
                raise TemplateRenderError(
                    f"messages[{index}].tool_calls must be a list of tool calls", field="messages"
                )
            if calls:
                copy["tool_calls"] = [self._normalize_call(call) for call in copy["tool_calls"]]
            out.append(copy)
        return out

    def _render(
        self, messages: list[dict[str, Any]], tools: Sequence[Mapping[str, Any]] | None, add_generation_prompt: bool
    ) -> str:
        try:
            pieces = self._template.generate(
                messages=messages,
                tools=list(tools) if tools else None,
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token,
                eos_token=self.eos_token,
            )
            return joined("", pieces, "the rendered prompt")
        except TemplateRenderError:
            raise
        except Exception as exc:  # untrusted code: any failure is the template's
            raise TemplateRenderError(f"the chat template failed to render: {exc}", field="messages") from exc

    # -- tool-call arguments -----------------------------------------------------------

    def _normalize_call(self, call: Any) -> Any:
        if not isinstance(call, Mapping) or not isinstance(call.get("function"), Mapping):
            return call
        arguments = call["function"].get("arguments")
        if not isinstance(arguments, str) or not self.requires_object_arguments:
            return call
        try:
            parsed = json.loads(arguments)
        except (ValueError, RecursionError):
            return call  # not JSON (or too deep to read): let the template show it as it is
        if not isinstance(parsed, Mapping):
            return call
        return {**call, "function": {**call["function"], "arguments": parsed}}

    @property
    def requires_object_arguments(self) -> bool:
        """True if the template renders tool-call arguments correctly only when
        they are a mapping (it applies ``tojson`` to them), found by rendering a
        probe conversation once (the approach of llama.cpp's minja)."""
        if self._object_arguments is None:
            as_string = self._probe_renders_arguments(json.dumps(_PROBE_ARGUMENTS))
            as_object = self._probe_renders_arguments(_PROBE_ARGUMENTS)
            self._object_arguments = as_object and not as_string
        return self._object_arguments

    def _probe_renders_arguments(self, arguments: Any) -> bool:
        call = {"id": "call_1___", "type": "function", "function": {"name": "ipython", "arguments": arguments}}
        messages: list[dict[str, Any]] = [
            {"role": "user", "content": "Hey"},
            {"role": "assistant", "content": "", "tool_calls": [call]},
        ]
        try:
            text = self._render(messages, None, False)
        except TemplateRenderError:
            return False
        return any(f"{q}{_PROBE_NEEDLE}{q}:" in text for q in ('"', "'"))


def _token_text(model: Any, token: int) -> str:
    """A special token's text ("" for a missing token, id -1)."""
    return model.token_to_bytes(token, special=True).decode("utf-8", "replace") if token >= 0 else ""


def _content_text(content: Any, index: int) -> Any:
    """A message's content as text; None and strings pass through."""
    if content is None or isinstance(content, str):
        return content
    if isinstance(content, Sequence) and not isinstance(content, (bytes, bytearray)):
        texts: list[str] = []
        for part in content:
            if isinstance(part, str):
                texts.append(part)
            elif isinstance(part, Mapping) and part.get("type") == "text" and isinstance(part.get("text"), str):
                texts.append(part["text"])
            else:
                kind = part.get("type") if isinstance(part, Mapping) else type(part).__name__
                raise TemplateRenderError(
                    f"messages[{index}].content: parts of type {kind!r} are not supported (text only)",
                    field="messages",
                )
        return "\n".join(texts)
    raise TemplateRenderError(f"messages[{index}].content must be text or a list of text parts", field="messages")

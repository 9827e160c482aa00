"""What the chat-template sandbox may allocate: bounds on the operations that can build a
large value from a small template or small message content.

Two kinds of bound, each refused with jinja2's `SecurityError` (which `ChatTemplate` turns
into `TemplateRenderError`) before the value is built:

- widths and counts (`MAX_REPEAT_LENGTH`): ``*``, ``ljust``/``rjust``/``center``/``zfill``,
  ``expandtabs``, the ``center`` and ``indent`` filters, widths and precisions in ``%``
  formatting, the ``format`` filter and ``str.format``, ``batch``/``slice`` counts;
- lengths of built text (`MAX_RENDER_LENGTH`): ``~`` and ``+``, ``join``, ``replace``,
  ``indent``, ``wordwrap``, ``tojson`` and the rendered prompt itself.

``tojson`` indents by at most `MAX_JSON_INDENT`, and ``lipsum`` is not available.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from jinja2 import filters, nodes, pass_environment, pass_eval_context
from jinja2.compiler import CodeGenerator, Frame
from jinja2.exceptions import SecurityError
from jinja2.filters import make_attrgetter
from jinja2.nodes import EvalContext
from jinja2.sandbox import SandboxedFormatter

MAX_REPEAT_LENGTH = 1 << 20
"""Longest string or list a template may build with ``*``, and the largest width,
precision, padding or count it may ask of a string operation or filter."""

MAX_POWER_EXPONENT = 4096
"""Largest exponent a template may use with ``**``."""

MAX_RENDER_LENGTH = 32 << 20
"""Longest text a template may render, or build by joining, concatenating, replacing,
indenting, wrapping or ``tojson``. No context holds a prompt anywhere near this long."""

MAX_JSON_INDENT = 16
"""Widest indent ``tojson`` may use (spaces, or characters of an indent string): a line
is indented once per nesting level, and JSON may nest hundreds of levels deep."""

# A %-conversion: mapping key, flags, width (group 1), precision (group 2), conversion.
_PERCENT_SPEC = re.compile(r"%(?:\([^)]*\))?[-#0 +]*(\*|\d+)?(?:\.(\*|\d*))?[hlL]?(.)", re.S)


def check_width(width: Any, what: str) -> None:
    """Refuse a width, precision or count beyond `MAX_REPEAT_LENGTH`."""
    size = len(width) if isinstance(width, str) else width
    if isinstance(size, int) and size > MAX_REPEAT_LENGTH:
        raise SecurityError(f"{what} {size:,} is beyond the chat template limit of {MAX_REPEAT_LENGTH:,}")


def check_length(length: int, what: str) -> None:
    """Refuse building text longer than `MAX_RENDER_LENGTH`."""
    if length > MAX_RENDER_LENGTH:
        raise SecurityError(f"{what} would be longer than the chat template limit of {MAX_RENDER_LENGTH:,} characters")


def joined(separator: str, items: Iterable[Any], what: str = "joined text") -> str:
    """`separator.join(str(item) for item in items)`, refused before it grows too long."""
    parts, total = [], 0
    for item in items:
        part = item if isinstance(item, str) else str(item)
        total += len(part) + len(separator)
        check_length(total - len(separator), what)
        parts.append(part)
    return separator.join(parts)


def check_percent_format(text: str, values: Any) -> None:
    """Refuse widths and precisions beyond the bound in ``text % values``."""
    args = list(values) if isinstance(values, tuple) else [values]
    position = 0
    for spec in _PERCENT_SPEC.finditer(text):
        if spec.group(3) == "%":
            continue
        for number in spec.group(1, 2):
            if number == "*":
                check_width(args[position] if position < len(args) else 0, "a % format width")
                position += 1
            elif number:
                check_width(int(number), "a % format width or precision")
        position += 1


def check_str_call(method: str, text: str, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> None:
    """Refuse a call of the str method `method` on `text` that would build too much
    (``join`` is bounded by calling `joined` instead)."""
    if method in ("ljust", "rjust", "center", "zfill") and args:
        check_width(args[0], f"str.{method} width")
    elif method == "expandtabs":
        tabsize = args[0] if args else kwargs.get("tabsize", 8)
        check_width(tabsize, "str.expandtabs tab size")
        if isinstance(tabsize, int):
            check_length(len(text) + text.count("\t") * tabsize, "str.expandtabs text")
    elif method == "replace" and len(args) >= 2:
        check_replace(text, args[0], args[1], args[2] if len(args) > 2 else kwargs.get("count", -1))


def check_replace(text: str, old: Any, new: Any, count: Any) -> None:
    """Refuse a ``replace`` whose result would be too long."""
    if not (isinstance(old, str) and isinstance(new, str)) or len(new) <= len(old):
        return
    found = len(text) + 1 if old == "" else text.count(old)
    if isinstance(count, int) and count >= 0:
        found = min(found, count)
    check_length(len(text) + found * (len(new) - len(old)), "replaced text")


def tojson(
    value: Any,
    indent: int | str | None = None,
    ensure_ascii: bool = False,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    """The ``tojson`` filter: plain JSON as Hugging Face renders it (not jinja2's
    HTML-escaped variant), with a bounded indent and length."""
    if indent is not None and (len(indent) if isinstance(indent, str) else indent) > MAX_JSON_INDENT:
        raise SecurityError(f"tojson indent is beyond the chat template limit of {MAX_JSON_INDENT}")
    encoder = json.JSONEncoder(indent=indent, ensure_ascii=ensure_ascii, separators=separators, sort_keys=sort_keys)
    if indent is None:  # at most a few times as long as the value's own text: built at once
        text = encoder.encode(value)
        check_length(len(text), "tojson text")
        return text
    return joined("", encoder.iterencode(value), "tojson text")


class BoundedFormatter(SandboxedFormatter):
    """jinja2's sandboxed ``str.format`` with bounded widths and precisions."""

    def format_field(self, value: Any, format_spec: str) -> Any:
        for number in re.findall(r"\d+", format_spec):
            check_width(int(number), "a format width or precision")
        return super().format_field(value, format_spec)


def bounded_str_format(environment: Any, method: Any) -> Callable[..., str]:
    """A sandboxed, bounded stand-in for ``text.format`` or ``text.format_map``."""
    text, formatter = method.__self__, BoundedFormatter(environment)

    def format_map(mapping: Mapping[str, Any]) -> str:
        return str(formatter.vformat(text, (), mapping))

    def format_args(*args: Any, **kwargs: Any) -> str:
        return str(formatter.vformat(text, args, kwargs))

    return functools.update_wrapper(format_map if method.__name__ == "format_map" else format_args, method)


class BoundedCodeGenerator(CodeGenerator):
    """jinja2's code generator with ``~`` compiled to `joined` (through the environment)."""

    def visit_Concat(self, node: nodes.Concat, frame: Frame) -> None:
        self.write("environment.concat_bounded((")
        for arg in node.nodes:
            self.visit(arg, frame)
            self.write(", ")
        self.write("))")


def _center(value: Any, width: int = 80) -> str:
    check_width(width, "center width")
    return filters.do_center(value, width)


def _indent(s: Any, width: int | str = 4, first: bool = False, blank: bool = False) -> str:
    check_width(width, "indent width")
    step = len(width) if isinstance(width, str) else width
    if isinstance(step, int):
        check_length(len(str(s)) + (str(s).count("\n") + 1) * step, "indented text")
    return filters.do_indent(s, width, first, blank)


def _format(value: Any, *args: Any, **kwargs: Any) -> str:
    check_percent_format(str(value), kwargs or args)
    return filters.do_format(value, *args, **kwargs)


@pass_eval_context
def _replace(eval_ctx: EvalContext, s: Any, old: Any, new: Any, count: int | None = None) -> str:
    check_replace(str(s), old, new, -1 if count is None else count)
    return filters.do_replace(eval_ctx, s, old, new, count)


@pass_eval_context
def _join(eval_ctx: EvalContext, value: Iterable[Any], d: str = "", attribute: str | int | None = None) -> str:
    if attribute is not None:
        value = map(make_attrgetter(eval_ctx.environment, attribute), value)
    return joined(str(d), value)


@pass_environment
def _wordwrap(
    environment: Any,
    s: str,
    width: int = 79,
    break_long_words: bool = True,
    wrapstring: str | None = None,
    break_on_hyphens: bool = True,
) -> str:
    lines = len(s) // max(width, 1) + s.count("\n") + 1 if isinstance(width, int) else 1
    check_length(len(s) + lines * len(wrapstring or "\n"), "wrapped text")
    return filters.do_wordwrap(environment, s, width, break_long_words, wrapstring, break_on_hyphens)


def _batch(value: Iterable[Any], linecount: int, fill_with: Any = None) -> Any:
    check_width(linecount, "batch size")
    return filters.do_batch(value, linecount, fill_with)


def _slice(value: Any, slices: int, fill_with: Any = None) -> Any:
    check_width(slices, "slice count")
    return filters.sync_do_slice(value, slices, fill_with)


BOUNDED_FILTERS: dict[str, Callable[..., Any]] = {
    "batch": _batch,
    "center": _center,
    "format": _format,
    "indent": _indent,
    "join": _join,
    "replace": _replace,
    "slice": _slice,
    "tojson": tojson,
    "wordwrap": _wordwrap,
}
"""The filters that replace jinja2's own (and its HTML-escaping ``tojson``)."""

__all__ = [
    "BOUNDED_FILTERS",
    "MAX_JSON_INDENT",
    "MAX_POWER_EXPONENT",
    "MAX_RENDER_LENGTH",
    "MAX_REPEAT_LENGTH",
    "BoundedCodeGenerator",
    "bounded_str_format",
    "check_length",
    "check_percent_format",
    "check_str_call",
    "check_width",
    "joined",
]

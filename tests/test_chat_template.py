"""ChatTemplate: GGUF templates, the helpers templates expect, tool calls, the sandbox."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest
from chat_data import HISTORY, WEATHER_TOOL

from kvchat.chat.template import CHATML_TEMPLATE, ChatTemplate, TemplateRenderError
from kvchat.errors import InvalidRequestError
from kvchat.llama import Model

QWEN_DEFAULT_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."


def tool_call_history(arguments: object) -> list[dict]:
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": arguments}}
    return [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 21}'},
    ]


# -- the model's own template ------------------------------------------------------------


def test_qwen_template_renders_a_history_as_handwritten_chatml(qwen_model: Model) -> None:
    template = ChatTemplate.for_model(qwen_model)
    assert template.source == qwen_model.metadata["tokenizer.chat_template"]
    assert (template.bos_token, template.eos_token) == ("<|endoftext|>", "<|im_end|>")
    expected = (
        "<|im_start|>system\nYou are terse.<|im_end|>\n"
        "<|im_start|>user\nHi there!<|im_end|>\n"
        "<|im_start|>assistant\nHello. How can I help?<|im_end|>\n"
    )
    assert template.render(HISTORY, add_generation_prompt=False) == expected
    assert template.render(HISTORY) == expected + "<|im_start|>assistant\n"


def test_qwen_template_adds_its_default_system_prompt(qwen_model: Model) -> None:
    rendered = ChatTemplate.for_model(qwen_model).render([{"role": "user", "content": "Hi"}])
    assert rendered == (
        f"<|im_start|>system\n{QWEN_DEFAULT_SYSTEM}<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )


def test_gemma_without_template_falls_back_to_chatml_with_a_log_line(
    gemma_model: Model, caplog: pytest.LogCaptureFixture
) -> None:
    assert gemma_model.chat_template is None
    with caplog.at_level(logging.INFO, logger="kvchat.chat"):
        template = ChatTemplate.for_model(gemma_model)
    assert template.source == CHATML_TEMPLATE
    assert any(r.name == "kvchat.chat" and "no chat template" in r.message for r in caplog.records)
    assert (template.bos_token, template.eos_token) == ("<bos>", "<eos>")
    assert template.render(HISTORY[1:2]) == "<|im_start|>user\nHi there!<|im_end|>\n<|im_start|>assistant\n"


# -- tool calls ------------------------------------------------------------------------


def test_qwen_tool_call_arguments_are_rendered_as_a_json_object(qwen_model: Model) -> None:
    template = ChatTemplate.for_model(qwen_model)
    assert template.requires_object_arguments  # Qwen applies `tojson` to the arguments
    as_string = template.render(tool_call_history('{"city": "Paris"}'), tools=[WEATHER_TOOL])
    as_object = template.render(tool_call_history({"city": "Paris"}), tools=[WEATHER_TOOL])
    assert as_string == as_object
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>\n' in as_string
    assert "<|im_start|>user\n<tool_response>\n{\"temp\": 21}\n</tool_response><|im_end|>\n" in as_string
    assert json.dumps(WEATHER_TOOL) in as_string  # tool definitions as plain JSON, not HTML-escaped


def test_normalize_does_not_change_the_callers_messages(qwen_model: Model) -> None:
    messages = tool_call_history('{"city": "Paris"}')
    before = json.dumps(messages)
    ChatTemplate.for_model(qwen_model).render(messages)
    assert json.dumps(messages) == before


def test_a_template_that_prints_arguments_gets_them_as_given() -> None:
    template = ChatTemplate(
        "{% for m in messages %}{% for c in m.tool_calls or [] %}{{ c.function.arguments }}{% endfor %}{% endfor %}"
    )
    assert not template.requires_object_arguments
    assert template.render(tool_call_history('{"city": "Paris"}')) == '{"city": "Paris"}'


def test_tool_call_arguments_too_deep_for_json_are_text_or_a_render_error() -> None:
    template = ChatTemplate(
        "{% for m in messages %}{% for c in m.tool_calls or [] %}{{ c.function.arguments | tojson }}"
        "{% endfor %}{% endfor %}"
    )
    assert template.requires_object_arguments
    deep = "[" * 100_000 + "]" * 100_000  # json.loads gives up with a RecursionError
    assert template.render(tool_call_history(deep)) == json.dumps(deep)
    arguments: dict = {}
    for _ in range(100_000):
        arguments = {"a": arguments}
    with pytest.raises(TemplateRenderError):
        template.render(tool_call_history(arguments))


def test_content_parts_are_joined_to_text() -> None:
    template = ChatTemplate(CHATML_TEMPLATE)
    parts = [{"type": "text", "text": "first"}, {"type": "text", "text": "second"}]
    assert template.render([{"role": "user", "content": parts}], add_generation_prompt=False) == (
        "<|im_start|>user\nfirst\nsecond<|im_end|>\n"
    )
    image = [{"type": "image_url", "image_url": {"url": "http://x"}}]
    with pytest.raises(TemplateRenderError, match="image_url"):
        template.render([{"role": "user", "content": image}])


# -- helpers templates expect ------------------------------------------------------------


def test_helpers_raise_exception_tojson_strftime_now_and_loop_controls() -> None:
    template = ChatTemplate(
        "{% if messages[0].role != 'user' %}{{ raise_exception('first message must be a user turn') }}{% endif %}"
        "{{ messages[0] | tojson }}|{{ {'a': [1, 2]} | tojson(indent=2) }}|{{ strftime_now('%Y') }}|"
        "{% for m in messages %}{% if loop.index > 2 %}{% break %}{% endif %}"
        "{% if m.role == 'skip' %}{% continue %}{% endif %}{{ m.role }},{% endfor %}"
        "{% generation %}gen{% endgeneration %}"
    )
    messages = [{"role": "user", "content": "<é>"}, {"role": "skip", "content": ""}, {"role": "x", "content": ""}]
    year = __import__("datetime").datetime.now().strftime("%Y")
    assert template.render(messages) == (
        '{"role": "user", "content": "<é>"}|{\n  "a": [\n    1,\n    2\n  ]\n}|' + year + "|user,gen"
    )
    with pytest.raises(TemplateRenderError, match="first message must be a user turn") as info:
        template.render([{"role": "assistant", "content": "x"}])
    assert isinstance(info.value, InvalidRequestError)


def test_a_template_that_does_not_compile_is_a_render_error() -> None:
    with pytest.raises(TemplateRenderError) as info:
        ChatTemplate("{% for m in messages %}")
    assert info.value.field == "chat_template"


# -- the sandbox -------------------------------------------------------------------------

HOSTILE_TEMPLATES = [
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ ''.__class__ }}",
    "{{ ''['__class__'] }}",
    "{{ '' | attr('__class__') }}",
    "{{ '{0.__class__}'.format('') }}",
    "{{ messages | map(attribute='__class__') | list }}",
    "{{ cycler.__init__.__globals__.os.environ['KVCHAT_SANDBOX_SECRET'] }}",
    "{{ cycler.__init__.__globals__.os.system('touch {marker}') }}",
    "{{ lipsum.__globals__['os'].popen('touch {marker}').read() }}",
    "{{ self.__dict__ }}",
    "{{ self._TemplateReference__context.cycler.__init__.__globals__.os.environ }}",
    "{{ raise_exception.__globals__['__builtins__'] }}",
    "{{ (messages | first).items.__self__.__class__ }}",
    "{% import 'os' as os %}{{ os.environ['KVCHAT_SANDBOX_SECRET'] }}",
    "{% include '/etc/passwd' %}",
    "{% extends '/etc/passwd' %}",
    "{{ messages.append({'role': 'system'}) }}",
    "{{ 'a' * 100000000 }}",
    "{{ 10 ** 100000000 }}",
    "{% for x in range(10 ** 9) %}{% endfor %}",
]


@pytest.mark.parametrize("source", HOSTILE_TEMPLATES)
def test_hostile_templates_fail_and_do_not_execute(
    source: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    secret = "s3cr3t-sandbox-value"
    monkeypatch.setenv("KVCHAT_SANDBOX_SECRET", secret)
    marker = tmp_path / "pwned"
    template = ChatTemplate(source.replace("{marker}", str(marker)))
    with pytest.raises(TemplateRenderError) as info:
        template.render([{"role": "user", "content": "hi"}])
    assert isinstance(info.value, InvalidRequestError)
    assert secret not in str(info.value)
    assert not marker.exists()
    assert os.environ["KVCHAT_SANDBOX_SECRET"] == secret


# Each would allocate hundreds of megabytes (a larger number: gigabytes, or an out-of-memory
# kill); kept small enough that an unbounded sandbox survives rendering them.
BIG = 200_000_000
OVERSIZED_TEMPLATES = [
    f"{{{{ 'a'.ljust({BIG}) }}}}",
    f"{{{{ 'a'.rjust({BIG}, '-') }}}}",
    f"{{{{ 'a'.center({BIG}, '*') }}}}",
    f"{{{{ '7'.zfill({BIG}) }}}}",
    f"{{{{ 'a\tb'.expandtabs({BIG}) }}}}",
    f"{{{{ 'a' | center({BIG}) }}}}",
    f"{{{{ 'a\nb' | indent({BIG}) }}}}",
    f"{{{{ '%{BIG}s' % 'a' }}}}",
    f"{{{{ '%-*d' % ({BIG}, 7) }}}}",
    f"{{{{ '%.{BIG}f' % 1.5 }}}}",
    f"{{{{ '%{BIG}s' | format('a') }}}}",
    f"{{{{ '{{:>{BIG}}}'.format('a') }}}}",
    f"{{{{ '{{:{{w}}}}'.format('a', w={BIG}) }}}}",
    f"{{{{ '{{x:^{BIG}}}'.format_map({{'x': 'a'}}) }}}}",
    f"{{{{ messages | tojson(indent={BIG}) }}}}",
    f"{{{{ messages | tojson(indent=' ' * {BIG // 1000}) }}}}",
    "{{ ('a' * 100000).replace('a', 'b' * 1000) }}",
    "{{ ('a' * 100000) | replace('a', 'b' * 1000) }}",
    "{{ ('x' * 1000000).join(['a'] * 100) }}",
    "{{ range(100) | join('x' * 1000000) }}",
    "{{ ('ab' * 100000) | wordwrap(1, wrapstring='x' * 1000) }}",
    "{% set ns = namespace(s='x' * 1000000) %}{% for i in range(8) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}",
    "{% set ns = namespace(s='x' * 1000000) %}{% for i in range(8) %}{% set ns.s = ns.s + ns.s %}{% endfor %}",
    "{% for i in range(100) %}{{ 'x' * 1000000 }}{% endfor %}",
    "{{ [1] | batch(100000000, 'x') | list }}",
    "{{ lipsum(100000) }}",
]


@pytest.mark.parametrize("source", OVERSIZED_TEMPLATES)
def test_templates_that_would_allocate_too_much_fail_with_the_typed_error(source: str) -> None:
    with pytest.raises(TemplateRenderError) as info:
        ChatTemplate(source).render([{"role": "user", "content": "hi"}])
    assert isinstance(info.value, InvalidRequestError) and info.value.field == "messages"


def test_message_content_cannot_make_a_template_build_too_much() -> None:
    # A template that widens or repeats content by its length is bounded by the same limits.
    template = ChatTemplate("{% for m in messages %}{{ m.content | center(m.content | length * 1000) }}"
                            "{{ m.content.replace('a', m.content) }}{% endfor %}")
    assert template.render([{"role": "user", "content": "ab"}]) == "ab".center(2000) + "abb"
    with pytest.raises(TemplateRenderError):
        template.render([{"role": "user", "content": "a" * 10_000}])


def test_the_operations_still_work_within_their_bounds() -> None:
    template = ChatTemplate(
        "{{ 'a'.ljust(3, '.') }}|{{ '7'.zfill(3) }}|{{ 'x' | center(5) }}|{{ '%-4s|%.2f' % ('ab', 1.5) }}|"
        "{{ '%*d' % (3, 7) }}|{{ '{:>4}'.format('b') }}|{{ '{x:^{w}}'.format_map({'x': 'c', 'w': 3}) }}|"
        "{{ 'a\nb' | indent(2) }}|{{ messages | tojson(indent=2) | length > 0 }}|{{ 'a-b'.replace('-', '+') }}|"
        "{{ ', '.join(['x', 'y']) }}|{{ [1, 2] | join(' ') }}|{{ 'ab' ~ 'cd' + 'ef' }}|{{ 'a\tb'.expandtabs(2) }}|"
        "{{ [1, 2, 3] | batch(2, 0) | list }}"
    )
    assert template.render([{"role": "user", "content": "hi"}]) == (
        "a..|007|  x  |ab  |1.50|  7|   b| c |a\n  b|True|a+b|x, y|1 2|abcdef|a b|[[1, 2], [3, 0]]"
    )


def test_unsafe_access_fails_even_where_it_would_render_empty() -> None:
    # jinja2's sandbox alone would answer "not defined" here and render "".
    with pytest.raises(TemplateRenderError, match="unsafe"):
        ChatTemplate("{% if messages.__len__ is defined %}yes{% endif %}").render([])

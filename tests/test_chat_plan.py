"""The chat plan (`kvchat.chat.plan`): what a request asks of the model, from the
template and the request alone (no model, no engine, no tokenizer).

The last tests hold the plan to the branches `complete()` used to run inline, over
every combination of tool choice, tools, tool round and response format."""

from __future__ import annotations

import copy
import itertools
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

import pytest
from chat_data import HISTORY, WEATHER_TOOL

from kvchat import InvalidRequestError, SamplingParams
from kvchat.chat import ChatPlan, plan_chat
from kvchat.chat.plan import BANNED, call_format
from kvchat.chat.response_format import ANY_JSON_OBJECT, grammar_for_response_format
from kvchat.chat.template import CHATML_TEMPLATE, ChatTemplate
from kvchat.chat.tool_calls import HERMES, LLAMA3, MISTRAL, ToolCallFormat, detect_format
from kvchat.chat.tool_requests import normalize_tool_choice, tool_call_grammar, validate_tools
from kvchat.chat.tool_round import CLOSING_NOTE, NO_CALL_OPENING, closing_messages
from kvchat.engine import Grammar

# A Qwen-like template: tools in the system turn, calls in <tool_call> tags, every
# message rendered in place (so a later system message, the closing note, stays last).
HERMES_TEMPLATE = (
    "{%- if tools %}<|im_start|>system\nTools: {{ tools | tojson }}\n"
    "Call one as <tool_call>{\"name\": ..., \"arguments\": ...}</tool_call><|im_end|>\n{%- endif %}"
    "{%- for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{%- endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n{%- endif %}"
)
# The same, but it drops any system message after the first: no closing note fits.
DROPPING_TEMPLATE = HERMES_TEMPLATE.replace(
    "{%- for m in messages %}", "{%- for m in messages if m.role != 'system' or loop.first %}")
MISTRAL_TEMPLATE = (
    "{%- for m in messages %}[INST]{{ m.content }}[/INST]{%- if m.tool_calls %}[TOOL_CALLS] [...]{%- endif %}"
    "{%- endfor %}"
)
TAGS = {"<tool_call>": 151657, "</tool_call>": 151658, "[TOOL_CALLS]": 5}
ASK = [{"role": "user", "content": "Weather in Paris?"}]
ROUND = [
    *ASK,
    {"role": "assistant", "content": "", "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "21 C, sunny"},
]
TOOLS = [WEATHER_TOOL]
JSON_OBJECT = {"type": "json_object"}


def hermes() -> ChatTemplate:
    return ChatTemplate(HERMES_TEMPLATE)


# -- what the plan holds ------------------------------------------------------------------------


def test_a_plain_chat_renders_its_messages_and_asks_for_nothing_else() -> None:
    plan = plan_chat(hermes(), HISTORY)
    assert plan == ChatPlan(messages=tuple(HISTORY), tools=None, grammar=None, banned_tokens=(), tool_format=None)


def test_tools_on_auto_are_shown_and_the_reply_is_read_in_the_templates_format() -> None:
    plan = plan_chat(hermes(), ASK, tools=TOOLS)
    assert plan.tools == tuple(TOOLS) and plan.messages == tuple(ASK)
    assert plan.tool_format == replace(HERMES, bare_start="{")  # a bare JSON call counts too
    assert plan.grammar is None and plan.banned_tokens == ()


def test_response_format_gives_the_grammar_when_no_call_is_forced() -> None:
    plan = plan_chat(hermes(), ASK, tools=TOOLS, response_format=JSON_OBJECT)
    assert plan.grammar == Grammar.json_schema(ANY_JSON_OBJECT)
    assert plan.tool_format is not None  # the model may still call a tool


def test_a_required_call_is_forced_with_the_models_own_tag_tokens() -> None:
    plan = plan_chat(hermes(), ASK, tools=TOOLS, tool_choice="required", tag_tokens=TAGS)
    fmt = replace(HERMES, bare_start="{")
    expected = tool_call_grammar(TOOLS, format=fmt, tag_tokens={"<tool_call>": 151657, "</tool_call>": 151658})
    assert plan.grammar == expected
    assert plan.tools == tuple(TOOLS) and plan.tool_format == fmt and plan.banned_tokens == ()


def test_without_tag_tokens_the_forced_call_spells_its_tags() -> None:
    spelled = plan_chat(hermes(), ASK, tools=TOOLS, tool_choice="required")
    assert spelled.grammar == tool_call_grammar(TOOLS, format=HERMES)
    assert spelled.grammar != plan_chat(hermes(), ASK, tools=TOOLS, tool_choice="required", tag_tokens=TAGS).grammar


def test_a_named_tool_is_forced_and_overrides_response_format_unread() -> None:
    second = {"type": "function", "function": {"name": "get_time"}}
    choice = {"type": "function", "function": {"name": "get_time"}}
    plan = plan_chat(hermes(), ASK, tools=[WEATHER_TOOL, second], tool_choice=choice,
                     response_format={"type": "no such format"})
    assert plan.grammar == tool_call_grammar([WEATHER_TOOL, second], name="get_time", format=HERMES)


def test_tool_choice_none_outside_a_tool_round_hides_the_tools() -> None:
    plan = plan_chat(hermes(), ASK, tools=TOOLS, tool_choice="none")
    assert plan == plan_chat(hermes(), ASK)


def test_tool_choice_none_after_a_tool_round_closes_it() -> None:
    plan = plan_chat(hermes(), ROUND, tools=TOOLS, tool_choice="none", tag_tokens=TAGS)
    assert plan.messages == (*ROUND, {"role": "system", "content": CLOSING_NOTE})
    assert plan.tools == tuple(TOOLS)  # kept: the prompt continues the one that made the call
    assert plan.grammar == NO_CALL_OPENING
    assert plan.banned_tokens == (TAGS["<tool_call>"],)
    assert plan.tool_format is None  # nothing in the reply is read as a call


def test_a_closed_tool_round_keeps_the_response_format_and_bans_nothing_without_an_opening_token() -> None:
    plan = plan_chat(hermes(), ROUND, tools=TOOLS, tool_choice="none", response_format=JSON_OBJECT)
    assert plan.grammar == Grammar.json_schema(ANY_JSON_OBJECT)
    assert plan.banned_tokens == ()  # "<tool_call>" is not one token here


def test_a_template_that_cannot_place_the_closing_note_hides_the_tools() -> None:
    template = ChatTemplate(DROPPING_TEMPLATE)
    plan = plan_chat(template, ROUND, tools=TOOLS, tool_choice="none", tag_tokens=TAGS)
    assert plan == plan_chat(template, ROUND)


def test_tags_of_other_formats_are_not_used() -> None:
    mistral = ChatTemplate(MISTRAL_TEMPLATE)
    plan = plan_chat(mistral, ASK, tools=TOOLS, tool_choice="required", tag_tokens=TAGS)
    assert plan.grammar == tool_call_grammar(TOOLS, format=MISTRAL, tag_tokens={"[TOOL_CALLS]": 5})
    assert plan.tool_format is MISTRAL


@pytest.mark.parametrize(("source", "expected"), [
    (HERMES_TEMPLATE, replace(HERMES, bare_start="{")),
    (CHATML_TEMPLATE, replace(HERMES, bare_start="{")),  # no format shown: Hermes
    (MISTRAL_TEMPLATE, MISTRAL),
    ("{{ '<|python_tag|>' }}{% for m in messages %}{{ m.content }}{% endfor %}", LLAMA3),
])
def test_call_format(source: str, expected: ToolCallFormat) -> None:
    assert call_format(ChatTemplate(source)) == expected


@pytest.mark.parametrize(("options", "field"), [
    ({"tools": []}, "tools"),
    ({"tools": [{"type": "function", "function": {"name": "bad name"}}]}, "tools"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"response_format": {"type": "xml"}}, "response_format"),
    ({"tools": TOOLS, "tool_choice": "none", "response_format": {"type": "xml"}}, "response_format"),
])
def test_bad_requests_raise_typed_errors(options: dict, field: str) -> None:
    with pytest.raises(InvalidRequestError) as info:
        plan_chat(hermes(), ROUND, **options)
    assert info.value.field == field


def test_planning_changes_nothing_it_is_given_and_gives_the_same_plan_again() -> None:
    messages, tools = copy.deepcopy(ROUND), copy.deepcopy(TOOLS)
    first = plan_chat(hermes(), messages, tools=tools, tool_choice="none", tag_tokens=TAGS)
    assert messages == ROUND and tools == TOOLS
    assert plan_chat(hermes(), messages, tools=tools, tool_choice="none", tag_tokens=TAGS) == first


# -- the plan's sampling ----------------------------------------------------------------------


def test_sampling_takes_the_plans_grammar_bans_and_prediction() -> None:
    plan = plan_chat(hermes(), ROUND, tools=TOOLS, tool_choice="none", tag_tokens=TAGS)
    base = SamplingParams(max_tokens=9, temperature=0.5, logit_bias={1: 2.0, TAGS["<tool_call>"]: 5.0},
                          prediction=(4, 4))
    sampling = plan.sampling(base, prediction=[7, 8])
    assert sampling.grammar == NO_CALL_OPENING
    assert dict(sampling.logit_bias) == {1: 2.0, TAGS["<tool_call>"]: BANNED}
    assert sampling.prediction == (7, 8)
    assert (sampling.max_tokens, sampling.temperature) == (9, 0.5)


def test_sampling_without_a_plan_grammar_keeps_the_callers() -> None:
    own = Grammar.regex("[a-z]+")
    sampling = plan_chat(hermes(), ASK).sampling(SamplingParams(grammar=own, prediction=(3,)))
    assert sampling.grammar == own and sampling.prediction == (3,) and not sampling.logit_bias


# -- the same decisions as complete()'s inline branches -----------------------------------------


def inline_plan(template: ChatTemplate, messages: Sequence[Mapping[str, Any]], tools: Any, tool_choice: Any,
                response_format: Any, tag_tokens: Mapping[str, int]) -> tuple:
    """complete()'s planning as it was written before the plan, its tokenizer calls
    (the tags that are one token) read from `tag_tokens`."""

    def tags_of(fmt: ToolCallFormat) -> dict[str, int]:
        return {tag: tag_tokens[tag] for tag in (fmt.start, fmt.end) if tag and tag in tag_tokens}

    if tools is not None:
        validate_tools(tools)
    choice = normalize_tool_choice(tool_choice, tools)
    prompt_messages = list(messages)
    visible_tools = None if choice == "none" else (list(tools) if tools else None)
    closed = closing_messages(template, prompt_messages, tools) if choice == "none" and tools else None
    tool_format = (detect_format(template.source) or HERMES) if visible_tools or closed else None
    if tool_format is not None and tool_format.bare_start is None:
        tool_format = replace(tool_format, bare_start="{")
    bias: dict[int, float] = {}
    if choice not in ("none", "auto"):
        forced = None if choice == "required" else choice
        call_fmt = tool_format or HERMES
        grammar = tool_call_grammar(visible_tools or [], name=forced, format=call_fmt, tag_tokens=tags_of(call_fmt))
    else:
        grammar = grammar_for_response_format(response_format)
    if closed is not None and tools and tool_format is not None:
        prompt_messages, visible_tools = closed, list(tools)
        opening = tags_of(tool_format).get(tool_format.start)
        if opening is not None:
            bias[opening] = -100.0
        grammar = grammar or NO_CALL_OPENING
        tool_format = None
    return prompt_messages, visible_tools, grammar, bias, tool_format


CHOICES = [None, "auto", "none", "required", {"type": "function", "function": {"name": "get_weather"}}]
FORMATS = [None, JSON_OBJECT, {"type": "text"}]


@pytest.mark.parametrize(("source", "messages", "tools", "tool_choice", "response_format"), [
    (source, messages, tools, choice, fmt)
    for source, messages, tools, choice, fmt in itertools.product(
        [HERMES_TEMPLATE, DROPPING_TEMPLATE, MISTRAL_TEMPLATE], [ASK, ROUND], [None, TOOLS], CHOICES, FORMATS)
    if tools or choice in (None, "auto", "none")
])
def test_the_plan_makes_the_decisions_complete_made_inline(source: str, messages: list, tools: Any,
                                                            tool_choice: Any, response_format: Any) -> None:
    template = ChatTemplate(source)
    plan = plan_chat(template, messages, tools=tools, tool_choice=tool_choice, response_format=response_format,
                     tag_tokens=TAGS)
    prompt, visible, grammar, bias, tool_format = inline_plan(template, messages, tools, tool_choice,
                                                              response_format, TAGS)
    assert list(plan.messages) == prompt
    assert (list(plan.tools) if plan.tools is not None else None) == visible
    assert plan.grammar == grammar and plan.tool_format == tool_format
    assert dict.fromkeys(plan.banned_tokens, BANNED) == bias

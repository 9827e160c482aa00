"""Tool calls: the streaming parser (pure logic), tool validation, and forced calls on Qwen."""

from __future__ import annotations

import json
import logging
import re

import pytest
from helpers import summary
from hypothesis import given, settings
from hypothesis import strategies as st

from kvchat import Engine, Grammar, InvalidRequestError, SamplingParams
from kvchat.chat.template import CHATML_TEMPLATE
from kvchat.chat.tool_calls import (
    HERMES,
    LLAMA3,
    MISTRAL,
    StreamingToolCallParser,
    TextDelta,
    ToolCall,
    ToolCallEvent,
    ToolCallFormat,
    MAX_ARGUMENTS_DEPTH,
    detect_format,
    parse_tool_calls,
)
from kvchat.chat.tool_requests import normalize_tool_choice, tool_call_grammar, validate_tools
from kvchat.llama import Model

ADD = {"type": "function", "function": {
    "name": "add", "description": "Add two integers.",
    "parameters": {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                   "required": ["a", "b"]}}}
MULTIPLY = {"type": "function", "function": {
    "name": "multiply", "description": "Multiply two integers.",
    "parameters": {"type": "object", "properties": {"x": {"type": "integer"}, "y": {"type": "integer"}},
                   "required": ["x", "y"]}}}


def feed_all(fmt: ToolCallFormat, chunks: list[str]) -> list:
    parser = StreamingToolCallParser(fmt)
    events = [e for chunk in chunks for e in parser.feed(chunk)]
    return events + parser.finish()


def split_at(text: str, cuts: list[int]) -> list[str]:
    bounds = [0, *sorted(set(cuts)), len(text)]
    return [text[a:b] for a, b in zip(bounds, bounds[1:])]


# (format, model output, expected summary)
EXAMPLES = [
    (HERMES, '<tool_call>\n{"name": "add", "arguments": {"a": 2, "b": 3}}\n</tool_call>', [("add", {"a": 2, "b": 3})]),
    (HERMES, 'Let me add.\n<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>\n'
             '<tool_call>\n{"name": "multiply", "arguments": {"x": 3, "y": 4}}\n</tool_call>\n',
     ["Let me add.\n", ("add", {"a": 1, "b": 2}), ("multiply", {"x": 3, "y": 4})]),
    # The first closing marker closes the call, even inside a JSON string: this one is malformed.
    (HERMES, '<tool_call>{"name": "echo", "arguments": {"s": "</tool_call> is a tag"}}</tool_call>',
     ['<tool_call>{"name": "echo", "arguments": {"s": "</tool_call> is a tag"}}</tool_call>']),
    (HERMES, '<tool_call>\n{"name": "add", "arguments": {"a": 1,}}\n</tool_call> done',
     ['<tool_call>\n{"name": "add", "arguments": {"a": 1,}}\n</tool_call> done']),
    (HERMES, 'a < b and <tool_ca is not a tag', ['a < b and <tool_ca is not a tag']),
    (HERMES, '<tool_call>{"name": "now"}</tool_call>\nDone.', [("now", {}), "\nDone."]),
    (HERMES, '<tool_call>{"name": "s", "arguments": "{\\"q\\": 1}"}</tool_call>', [("s", {"q": 1})]),
    # A name the model made up, spaces and all, is still a call (the client says "no such
    # tool"); an empty name, or one past MAX_CALL_NAME_LENGTH (256) characters, is text.
    (HERMES, '<tool_call>{"name": "cat notes.txt", "arguments": {"command": "cat notes.txt"}}</tool_call>',
     [("cat notes.txt", {"command": "cat notes.txt"})]),
    (HERMES, '<tool_call>{"name": "", "arguments": {}}</tool_call>', ['<tool_call>{"name": "", "arguments": {}}</tool_call>']),
    (HERMES, '<tool_call>{"name": "' + "n" * 257 + '", "arguments": {}}</tool_call>',
     ['<tool_call>{"name": "' + "n" * 257 + '", "arguments": {}}</tool_call>']),
    (HERMES, '<tool_call>{"name": "' + "n" * 256 + '", "arguments": {}}</tool_call>', [("n" * 256, {})]),
    (HERMES, '  \n', ['  \n']),
    (LLAMA3, '{"name": "add", "parameters": {"a": 2, "b": 3}}', [("add", {"a": 2, "b": 3})]),
    (LLAMA3, ' <|python_tag|>{"name": "add", "parameters": {"a": 1, "b": 1}}', [("add", {"a": 1, "b": 1})]),
    (LLAMA3, '{"name": "a", "parameters": {}}; {"name": "b", "parameters": {"k": "}"}}\n',
     [("a", {}), ("b", {"k": "}"})]),
    (LLAMA3, '{"city": "Paris"} is JSON', ['{"city": "Paris"} is JSON']),
    (LLAMA3, 'Call {"name": "add", "parameters": {}} later', ['Call {"name": "add", "parameters": {}} later']),
    (LLAMA3, '<|python_tag|>brave_search.call(query="x")', ['<|python_tag|>brave_search.call(query="x")']),
    (MISTRAL, '[TOOL_CALLS] [{"name": "add", "arguments": {"a": 2, "b": 3}}, {"name": "m", "arguments": {}}]',
     [("add", {"a": 2, "b": 3}), ("m", {})]),
    (MISTRAL, ' [{"name": "add", "arguments": {"a": 5, "b": 6}}]', [("add", {"a": 5, "b": 6})]),
    (MISTRAL, '[{"name": "q", "arguments": {"s": "say \\"]}\\" \\\\"}}]', [("q", {"s": 'say "]}" \\'})]),
    (MISTRAL, '[1, 2, 3] are numbers', ['[1, 2, 3] are numbers']),
    (MISTRAL, 'Sure. [TOOL_CALLS][{"name": "add", "arguments": {"a": 0, "b": 0}}]',
     ["Sure. ", ("add", {"a": 0, "b": 0})]),
    # A reply that is a call in a Markdown code fence (small models write that) is a call.
    (LLAMA3, '```json\n{"name": "add", "parameters": {"a": 2, "b": 3}}\n```\n', [("add", {"a": 2, "b": 3})]),
    (MISTRAL, ' ```\n[{"name": "add", "arguments": {"a": 1, "b": 1}}]\n```', [("add", {"a": 1, "b": 1})]),
    (LLAMA3, '```json\n{"city": "Paris"}\n```\nDone.', ['```json\n{"city": "Paris"}\n```\nDone.']),
    (LLAMA3, '```python\nprint({"name": 1})\n```', ['```python\nprint({"name": 1})\n```']),
    (LLAMA3, 'See ```json\n{"name": "add", "parameters": {}}\n```', ['See ```json\n{"name": "add", "parameters": {}}\n```']),
]
EXAMPLE_IDS = [f"{fmt.name}-{i}" for i, (fmt, _, _) in enumerate(EXAMPLES)]


@pytest.mark.parametrize(("fmt", "output", "expected"), EXAMPLES, ids=EXAMPLE_IDS)
def test_whole_output_gives_the_expected_events(fmt: ToolCallFormat, output: str, expected: list) -> None:
    assert summary(feed_all(fmt, [output])) == expected


@pytest.mark.parametrize(("fmt", "output", "expected"), EXAMPLES, ids=EXAMPLE_IDS)
def test_one_character_at_a_time_gives_the_same_events(fmt: ToolCallFormat, output: str, expected: list) -> None:
    assert summary(feed_all(fmt, list(output))) == expected


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(EXAMPLES), st.lists(st.integers(min_value=0, max_value=200), max_size=12))
def test_any_split_of_an_example_gives_the_same_events(example, cuts) -> None:
    fmt, output, expected = example
    assert summary(feed_all(fmt, split_at(output, [c % (len(output) + 1) for c in cuts]))) == expected


FRAGMENTS = ["<tool_call>", "</tool_call>", "<tool_", "</tool", "<|python_tag|>", "[TOOL_CALLS]", "[TOOL",
             '{"name": "f", "arguments": {"a": 1}}', '{"name": "g", "parameters": {}}',
             '[{"name": "h", "arguments": {}}]',
             "{", "}", "[", "]", '"', "\\", ";", " ", "\n", "text", "<", "x"]


@settings(max_examples=400, deadline=None)
@given(st.sampled_from([HERMES, LLAMA3, MISTRAL]), st.lists(st.sampled_from(FRAGMENTS), max_size=14),
       st.lists(st.integers(min_value=0, max_value=400), max_size=10))
def test_any_output_split_anywhere_gives_the_events_of_the_whole(fmt, fragments, cuts) -> None:
    output = "".join(fragments)
    whole = summary(feed_all(fmt, [output]))
    assert summary(feed_all(fmt, split_at(output, [c % (len(output) + 1) for c in cuts]))) == whole
    if all(isinstance(item, str) for item in whole):  # no call: the text is the output, verbatim
        assert "".join(whole) == output


def test_text_before_a_call_is_released_before_the_call_completes() -> None:
    parser = StreamingToolCallParser(HERMES)
    assert parser.feed("I will call it") == [TextDelta("I will call it")]
    assert parser.feed(" now <tool_") == [TextDelta(" now ")]  # "<tool_" is held: it may be the marker
    assert parser.feed('call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}') == []
    events = parser.feed("\n</tool_call>")
    assert [type(e) for e in events] == [ToolCallEvent]
    assert events[0].call.name == "add" and events[0].call.arguments == {"a": 1, "b": 2}
    assert parser.finish() == []


def test_two_calls_get_two_events_with_distinct_ids() -> None:
    _, hermes_two, _ = EXAMPLES[1]
    content, calls = parse_tool_calls(hermes_two, HERMES)
    assert content == "Let me add."
    assert [c.name for c in calls] == ["add", "multiply"]
    assert calls[0].id != calls[1].id
    assert all(re.fullmatch(r"call_[0-9a-f]{24}", c.id) for c in calls)
    _, mistral_two, _ = next(e for e in EXAMPLES if e[0] is MISTRAL and e[1].startswith("[TOOL_CALLS] "))
    _, mistral_calls = parse_tool_calls(mistral_two, MISTRAL)
    assert len({c.id for c in mistral_calls}) == 2
    assert all(re.fullmatch(r"[A-Za-z0-9]{9}", c.id) for c in mistral_calls)  # Mistral's template wants 9


def test_malformed_call_is_text_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    output = '<tool_call>\n{"name": "add", "arguments": {"a": 1\n</tool_call>'
    with caplog.at_level(logging.WARNING, logger="kvchat.chat"):
        content, calls = parse_tool_calls(output, HERMES)
    assert calls == [] and content == output
    assert any("malformed hermes tool call" in r.getMessage() for r in caplog.records)


def test_call_without_closing_marker_counts_if_its_json_is_complete() -> None:
    content, calls = parse_tool_calls('<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n', HERMES)
    assert content is None and [(c.name, c.arguments) for c in calls] == [("add", {"a": 1, "b": 2})]
    cut = '<tool_call>\n{"name": "add", "arguments": {"a": 1, "b'
    assert parse_tool_calls(cut, HERMES) == (cut, [])
    cut = '{"name": "add", "parameters": {"a": 1'
    assert parse_tool_calls(cut, LLAMA3) == (cut, [])


def test_whitespace_around_calls_is_dropped_and_other_text_kept() -> None:
    assert summary(feed_all(HERMES, ['\n<tool_call>{"name": "a", "arguments": {}}</tool_call>\n\n'])) == [("a", {})]
    assert summary(feed_all(HERMES, ['<tool_call>{"name": "a", "arguments": {}}</tool_call>\nok '])) == [
        ("a", {}), "\nok "]
    assert parse_tool_calls("  just text \n", HERMES) == ("  just text \n", [])


def test_tool_call_to_openai() -> None:
    call = ToolCall("call_1", "add", {"a": 1, "s": "é"})
    assert call.to_openai() == {"id": "call_1", "type": "function",
                                "function": {"name": "add", "arguments": '{"a": 1, "s": "é"}'}}
    assert json.loads(call.to_openai()["function"]["arguments"]) == call.arguments


def deep_object(depth: int) -> str:
    return '{"a": ' * (depth - 1) + "{}" + "}" * (depth - 1)


def at_stack_depth(frames: int, fn):
    """Call `fn` with `frames` more Python frames on the stack (as a server route would)."""
    return fn() if frames == 0 else at_stack_depth(frames - 1, fn)


CALL_IN = [(HERMES, "<tool_call>\n@\n</tool_call>"), (LLAMA3, "@"), (MISTRAL, "[TOOL_CALLS][@]")]


@pytest.mark.parametrize(("fmt", "wrap"), CALL_IN, ids=lambda v: getattr(v, "name", ""))
@pytest.mark.parametrize("as_string", [False, True])
def test_arguments_nested_beyond_the_bound_are_text_and_never_raise(fmt, wrap: str, as_string: bool) -> None:
    # 900 levels parse here, but a server turning the call back into JSON a few hundred
    # frames deeper hit the recursion limit: a 500.
    for depth, is_call in ((MAX_ARGUMENTS_DEPTH, True), (MAX_ARGUMENTS_DEPTH + 1, False), (900, False)):
        arguments = json.dumps(deep_object(depth)) if as_string else deep_object(depth)
        output = wrap.replace("@", '{"name": "f", "%s": %s}' % (fmt.arguments_key, arguments))
        content, calls = parse_tool_calls(output, fmt)
        assert [call.to_openai()["function"]["name"] for call in calls] == (["f"] if is_call else [])
        assert content == (None if is_call else output)
        for call in calls:
            assert json.loads(at_stack_depth(600, call.to_openai)["function"]["arguments"]) == json.loads(
                deep_object(depth))


@pytest.mark.parametrize(("template", "expected"), [
    ('{{- "\\n<tool_call>\\n{\\"name\\": \\"" }}{{ tool_call.name }}', HERMES),
    ('{{- \'{"name": "\' + tool_call.name + \'", "parameters": \' }}', LLAMA3),
    ("{{- '<|python_tag|>' + tool_call.name + '.call(' }}", LLAMA3),
    ('{%- if message.tool_calls %}{{- "[TOOL_CALLS] [" }}', MISTRAL),
    (CHATML_TEMPLATE, None),
])
def test_detect_format(template: str, expected: ToolCallFormat | None) -> None:
    assert detect_format(template) is expected


@pytest.mark.parametrize("tools", [
    None, [], {"type": "function"}, [{"type": "retrieval"}], [{"type": "function"}],
    [{"type": "function", "function": {"name": "bad name"}}],
    [{"type": "function", "function": {"name": "x" * 65}}],
    [{"type": "function", "function": {"name": "f", "parameters": "{}"}}],
    [{"type": "function", "function": {"name": "f", "description": 3}}],
    [ADD, ADD],
])
def test_bad_tools_are_rejected(tools) -> None:
    with pytest.raises(InvalidRequestError) as info:
        tool_call_grammar(tools, name=None, format=HERMES)
    assert info.value.field == "tools"


def test_validate_tools_gives_parameters_by_name() -> None:
    no_params = {"type": "function", "function": {"name": "now"}}
    assert validate_tools([ADD, no_params]) == {"add": ADD["function"]["parameters"],
                                                "now": {"type": "object", "properties": {}}}


@pytest.mark.parametrize(("choice", "tools", "expected"), [
    (None, [ADD], "auto"), (None, None, "none"), ("auto", [ADD], "auto"), ("auto", [], "none"),
    ("none", [ADD], "none"), ("required", [ADD], "required"),
    ({"type": "function", "function": {"name": "multiply"}}, [ADD, MULTIPLY], "multiply"),
])
def test_normalize_tool_choice(choice, tools, expected: str) -> None:
    assert normalize_tool_choice(choice, tools) == expected


@pytest.mark.parametrize(("choice", "tools"), [
    ("required", None), ("always", [ADD]), ({"type": "function"}, [ADD]),
    ({"type": "function", "function": {"name": "divide"}}, [ADD]),
    ({"type": "function", "function": {"name": "auto"}}, [{"type": "function", "function": {"name": "auto"}}]),
])
def test_bad_tool_choice_is_rejected(choice, tools) -> None:
    with pytest.raises(InvalidRequestError) as info:
        normalize_tool_choice(choice, tools)
    assert info.value.field == "tool_choice"


def test_grammar_for_an_unknown_named_tool_is_rejected() -> None:
    with pytest.raises(InvalidRequestError) as info:
        tool_call_grammar([ADD], name="divide", format=HERMES)
    assert info.value.field == "tool_choice"


def lark_text(grammar: Grammar) -> str:
    """A Lark grammar's text (llguidance takes Lark text as it is)."""
    return grammar.definition


def call_schema(grammar: Grammar) -> dict:
    """The JSON schema of the call (``call: %json {...}``)."""
    return json.loads(lark_text(grammar).split("call: %json ", 1)[1])


def test_grammar_wraps_the_call_schema_in_the_formats_tags() -> None:
    tricky = {"type": "function", "function": {"name": "root", "parameters": {
        "type": "object", "properties": {"root": {"$ref": "#/$defs/root"}}, "required": ["root"],
        "$defs": {"root": {"type": "string", "enum": ["root"]}}}}}
    grammar = tool_call_grammar([ADD, tricky], name=None, format=HERMES)
    assert lark_text(grammar).startswith('start: "<tool_call>\\n" call "\\n</tool_call>"\n')
    schema = call_schema(grammar)
    names = [alternative["properties"]["name"] for alternative in schema["anyOf"]]
    assert names == [{"const": "add"}, {"const": "root"}]
    assert schema["$defs"] == {"tool1-root": {"type": "string", "enum": ["root"]}}  # moved to the top, renamed
    assert schema["anyOf"][1]["properties"]["arguments"]["properties"]["root"] == {"$ref": "#/$defs/tool1-root"}
    assert schema["x-guidance"]["whitespace_flexible"] is False
    assert lark_text(tool_call_grammar([ADD], name=None, format=LLAMA3)).startswith("start: call\n")
    assert lark_text(tool_call_grammar([ADD], name=None, format=MISTRAL)).startswith(
        'start: "[TOOL_CALLS][" call "]"\n')


def test_grammar_asks_for_the_tag_tokens_it_is_given() -> None:
    grammar = tool_call_grammar([ADD], name=None, format=HERMES, tag_tokens={"<tool_call>": 7, "</tool_call>": 8})
    assert lark_text(grammar).startswith('start: <[7]> "\\n" call "\\n" <[8]>\n')
    mistral = tool_call_grammar([ADD], name=None, format=MISTRAL, tag_tokens={"[TOOL_CALLS]": 5})
    assert lark_text(mistral).startswith('start: <[5]> "[" call "]"\n')


def qwen_tags(model: Model) -> dict[str, int]:
    """Qwen's special tokens for the Hermes tags."""
    return {tag: model.tokenize(tag, parse_special=True)[0] for tag in ("<tool_call>", "</tool_call>")}


@pytest.mark.parametrize("tools", [[ADD], [ADD, {"type": "function", "function": {"name": "noop"}}]],
                         ids=["one tool", "two tools"])
def test_grammar_allows_no_blank_between_the_call_and_its_closing_tag(qwen_model: Model, tools: list) -> None:
    matcher = tool_call_grammar(tools, name=None, format=HERMES, tag_tokens=qwen_tags(qwen_model)).matcher(qwen_model)
    call = '<tool_call>\n{"name": "add", "arguments": {"a": 2, "b": 3}}'
    for token in qwen_model.tokenize(call, parse_special=True):
        assert matcher.allows(token), call
        matcher.accept(token)
    assert not matcher.allows(qwen_model.tokenize(" ")[0])
    assert not matcher.allows(qwen_model.tokenize("\n\n")[0])
    assert matcher.allows(qwen_model.tokenize("\n")[0])


def test_a_forced_call_is_laid_out_as_the_template_renders_it(qwen_model: Model) -> None:
    """No blank space inside the call's JSON but one after `,` and `:`: the layout of
    `json.dumps`, which the chat template's `tojson` writes too."""
    matcher = tool_call_grammar([ADD], name=None, format=HERMES, tag_tokens=qwen_tags(qwen_model)).matcher(qwen_model)
    for token in qwen_model.tokenize('<tool_call>\n{"name": "add", "arguments": {"a":', parse_special=True):
        matcher.accept(token)
    assert not matcher.allows(qwen_model.tokenize("2")[0])
    assert matcher.allows(qwen_model.tokenize(" 2")[0])


# -- forced calls on the real Qwen model -------------------------------------------------------


@pytest.fixture
def qwen(qwen_model: Model, qwen_engine: Engine) -> tuple[Model, Engine]:
    """The session's Qwen model and engine."""
    return qwen_model, qwen_engine


def generate(qwen: tuple[Model, Engine], user: str, grammar: Grammar) -> str:
    model, engine = qwen
    prompt = f"<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"
    sampling = SamplingParams(temperature=0, max_tokens=64, grammar=grammar)
    return engine.submit(model.tokenize(prompt, parse_special=True), sampling).collect().text


@pytest.mark.parametrize("fmt", [HERMES, LLAMA3, MISTRAL], ids=lambda f: f.name)
def test_forced_call_parses_to_one_add_call(qwen, fmt: ToolCallFormat) -> None:
    text = generate(qwen, "Add 2 and 3 using the tool.", tool_call_grammar([ADD], name=None, format=fmt))
    content, calls = parse_tool_calls(text, fmt)
    assert content is None, text
    assert len(calls) == 1 and calls[0].name == "add", text
    arguments = calls[0].arguments
    assert set(arguments) == {"a", "b"} and all(type(v) is int for v in arguments.values()), text
    assert sorted(arguments.values()) == [2, 3], text


def test_named_tool_is_the_one_called(qwen) -> None:
    grammar = tool_call_grammar([ADD, MULTIPLY], name="multiply", format=HERMES)
    text = generate(qwen, "Add 2 and 3 using the tool.", grammar)  # asks for add, the grammar forces multiply
    _, calls = parse_tool_calls(text, HERMES)
    assert [c.name for c in calls] == ["multiply"], text
    assert set(calls[0].arguments) == {"x", "y"} and all(type(v) is int for v in calls[0].arguments.values())

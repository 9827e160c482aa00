"""What OpenAI's Codex CLI sends to ``/v1/responses`` (``wire_api = "responses"``), served unchanged.

Codex (``@openai/codex`` 0.17x) sends ``stream``, ``store: false``, ``tool_choice: "auto"``,
``parallel_tool_calls``, ``reasoning``, ``include: ["reasoning.encrypted_content"]``,
``prompt_cache_key``, ``client_metadata``, developer and user messages of ``input_text`` parts,
function tools, a ``namespace`` tool holding more, and the built-in ``web_search``. Later turns
carry its history: ``reasoning`` items, ``function_call`` items (with their ``namespace``) and
``function_call_output`` items.

The first part needs no model: the translation of such a request (:func:`codex_body`), the
names a namespace's tools are offered under and how calls map back (the ``name`` and
``namespace`` Codex looks its tools up by), what is left out and reported, and a property test
over tool lists of every type. The second runs one real uvicorn over the session's Qwen engine
with the official ``openai`` client sending that request.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from typing import Any

import httpx
import pytest
from helpers import assert_idle
from http_server import RunningServer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from openai import OpenAI
from openai.types.responses import Response, ResponseFunctionToolCall, ResponseStreamEvent
from pydantic import TypeAdapter

from kvchat import Engine
from kvchat.chat.complete import ChatDelta
from kvchat.chat.tool_calls import ToolCall
from kvchat.chat.tool_requests import validate_tools
from kvchat.engine import SamplingParams, Usage
from kvchat.errors import InvalidRequestError
from kvchat.server import ServerSettings, create_app
from kvchat.server.response_objects import CallTarget, OutputBuilder, response_usage
from kvchat.server.responses_api import (
    ResponsesRequest,
    ToolOffer,
    chat_tools,
    check_supported,
    flat_name,
    input_messages,
    known_calls,
    response_frame,
)
from kvchat.server.routes.responses import OMITTED_TOOLS_HEADER, pulsed

MODEL = "qwen-codex"
EVENTS = TypeAdapter(ResponseStreamEvent)
NAMESPACE = "multi_agent_v1"


def function_tool(name: str, description: str, *properties: str) -> dict[str, Any]:
    """A function tool as Codex sends it (``strict: false``), with string parameters
    (Codex's own are longer: these keep the model's part of the tests short)."""
    parameters = {"type": "object", "properties": {key: {"type": "string"} for key in properties}}
    if properties:
        parameters["required"] = list(properties)
    return {"type": "function", "name": name, "description": description, "strict": False, "parameters": parameters}


CODEX_FUNCTIONS = [
    function_tool("exec_command", "Runs a shell command.", "cmd"),
    function_tool("write_stdin", "Writes to a running session.", "session_id", "chars"),
    function_tool("request_user_input", "Asks the user.", "question"),
    function_tool("view_image", "Shows a local image.", "path"),
    function_tool("get_goal", "Reads the goal."),
    function_tool("create_goal", "Sets a goal.", "goal"),
    function_tool("update_goal", "Updates the goal.", "goal"),
]
AGENTS = {
    "type": "namespace",
    "name": NAMESPACE,
    "description": "Tools to run sub-agents.",
    "tools": [
        function_tool("spawn_agent", "Starts a sub-agent with a task.", "message"),
        function_tool("wait_agent", "Waits for a sub-agent.", "id"),
    ],
}
INSTRUCTIONS = "You are Codex, a coding agent. Be brief."
CHAT_NAMES = [tool["name"] for tool in CODEX_FUNCTIONS] + [f"{NAMESPACE}__spawn_agent", f"{NAMESPACE}__wait_agent"]


def text_message(role: str, text: str, index: int) -> dict[str, Any]:
    return {"type": "message", "id": f"msg_{index}", "role": role, "content": [{"type": "input_text", "text": text}]}


CODEX_INPUT = [
    text_message("developer", "<permissions instructions>Sandbox: read-only.</permissions instructions>", 0),
    text_message("developer", "<skills_instructions>No skills are installed.</skills_instructions>", 1),
    text_message("user", "<environment_context><cwd>/work</cwd><shell>bash</shell></environment_context>", 2),
    text_message("user", "Wait for sub-agent 7.", 3),
]


def codex_body(**fields: Any) -> dict[str, Any]:
    """A request as Codex 0.17x sends its first turn (captured), with `fields` changed."""
    body = {
        "model": MODEL,
        "instructions": INSTRUCTIONS,
        "input": CODEX_INPUT,
        "tools": [*CODEX_FUNCTIONS, AGENTS, {"type": "web_search", "external_web_access": False}],
        "tool_choice": "auto",
        "parallel_tool_calls": True,
        "reasoning": {"effort": "medium", "summary": "auto"},
        "store": False,
        "stream": True,
        "include": ["reasoning.encrypted_content"],
        "prompt_cache_key": "01a25156-a2b1-7f70-98d2-60b9eab29eb6",
        "client_metadata": {"turn_id": "01a25156-a2c6-7021", "session_id": "01a25156-a2b1-7f70"},
    }
    return {**body, **fields}


# -- the request's translation (no model) -------------------------------------------------------


def test_a_codex_request_becomes_chat_messages_and_tools() -> None:
    body = ResponsesRequest.model_validate(codex_body())
    check_supported(body)  # reasoning, include, prompt_cache_key, client_metadata, store: accepted
    offer = chat_tools(body.tools, body.tool_choice)
    assert [tool["function"]["name"] for tool in offer.tools] == CHAT_NAMES
    assert offer.tool_choice == "auto" and offer.omitted == ("web_search",)
    spawn = offer.tools[7]["function"]
    assert spawn["description"] == "Tools to run sub-agents.\n\nStarts a sub-agent with a task."
    assert spawn["parameters"] == AGENTS["tools"][0]["parameters"] and "strict" not in spawn
    assert offer.targets[f"{NAMESPACE}__wait_agent"] == CallTarget("wait_agent", NAMESPACE, "function")
    assert offer.targets["exec_command"] == CallTarget("exec_command")
    validate_tools(offer.tools)  # what the chat runtime checks
    messages = input_messages(body.input, names=offer.chat_name)
    assert [message["role"] for message in messages] == ["system", "system", "user", "user"]
    assert messages[0]["content"] == CODEX_INPUT[0]["content"][0]["text"]
    assert messages[3]["content"] == "Wait for sub-agent 7."


def test_built_in_tools_alone_leave_no_tools() -> None:
    offer = chat_tools([{"type": "web_search"}, {"type": "mcp", "server_label": "x"}, {"type": "web_search"}], "auto")
    assert (offer.tools, offer.tool_choice, offer.omitted) == (None, "auto", ("web_search", "mcp"))


def test_the_response_reports_the_omitted_tools_and_parses_as_the_clients() -> None:
    body = ResponsesRequest.model_validate(codex_body())
    frame = response_frame(body, ServerSettings(model_name=MODEL), SamplingParams())
    assert frame.omitted_tools == ()  # the route adds what chat_tools left out
    usage = Usage(
        prompt_tokens=50,
        cached_tokens=40,
        evaluated_tokens=10,
        completion_tokens=3,
        time_to_first_token=0.1,
        finish_reason="stop",
    )
    reported = replace(frame, omitted_tools=chat_tools(body.tools, body.tool_choice).omitted)
    output, _ = build([ChatDelta("Done.")])
    parsed = Response.model_validate(reported.body("completed", output, response_usage(usage, cache_writes=True)))
    assert parsed.model_extra["kvchat_omitted_tools"] == ["web_search"]
    assert parsed.store is False and parsed.output_text == "Done."
    assert [tool.type for tool in parsed.tools] == ["function"] * 7 + ["namespace", "web_search"]
    assert parsed.reasoning.effort is None  # nothing reasoned


def build(
    deltas: list[ChatDelta], offer: ToolOffer | None = None, **options: Any
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The output items and the stream's events of a reply of `deltas` to a request
    whose tools are `offer` (default: Codex's); each event checked as the official
    client reads it."""
    offer = offer or chat_tools(codex_body()["tools"], "auto")
    builder = OutputBuilder(targets=offer.targets, **options)
    events = [event for delta in deltas for event in builder.add(delta)] + builder.finish("completed")
    for number, event in enumerate(events):
        EVENTS.validate_python({**event, "sequence_number": number})
    return builder.items, events


def test_a_namespaced_call_comes_back_as_codex_looks_it_up() -> None:
    """Codex runs a call by ``ToolName::new(namespace, name)`` from the function_call item."""
    spawn = ToolCall("call_1", f"{NAMESPACE}__spawn_agent", {"message": "list files"})
    run = ToolCall("call_2", "exec_command", {"cmd": "ls"})
    (first, second), events = build([ChatDelta(tool_calls=(spawn, run))])
    assert (first["type"], first["name"], first["namespace"], first["call_id"]) == (
        "function_call",
        "spawn_agent",
        NAMESPACE,
        "call_1",
    )
    assert "namespace" not in second and second["name"] == "exec_command"
    assert ResponseFunctionToolCall.model_validate(first).namespace == NAMESPACE
    done = [event for event in events if event["type"] == "response.output_item.done"]
    assert [event["item"] for event in done] == [first, second]  # what Codex runs
    arguments = [event for event in events if event["type"] == "response.function_call_arguments.done"]
    assert [event["name"] for event in arguments] == ["spawn_agent", "exec_command"]
    # parallel_tool_calls false keeps the first call only
    kept, _ = build([ChatDelta(tool_calls=(spawn, run))], max_calls=1)
    assert [item["call_id"] for item in kept] == ["call_1"]


def test_calls_sent_back_in_the_history_render_as_the_model_wrote_them() -> None:
    offer = chat_tools(codex_body()["tools"], "auto")
    spawn = ToolCall("call_1", f"{NAMESPACE}__spawn_agent", {"message": "list files"})
    output, _ = build([ChatDelta(tool_calls=(spawn,))], offer)
    history = [
        {"type": "reasoning", "id": "rs_1", "summary": [], "encrypted_content": "gAAAA=="},
        *output,
        {
            "type": "function_call_output",
            "call_id": "call_1",
            "output": [{"type": "input_text", "text": "agent 7"}, {"type": "input_text", "text": "started"}],
        },
    ]
    messages = input_messages(history, names=offer.chat_name)
    assert messages == [
        {"role": "assistant", "content": None, "tool_calls": [spawn.to_openai()]},
        {"role": "tool", "tool_call_id": "call_1", "name": f"{NAMESPACE}__spawn_agent", "content": "agent 7\nstarted"},
    ]
    assert known_calls(messages) == {"call_1": f"{NAMESPACE}__spawn_agent"}


def test_custom_tools_are_offered_as_one_string_and_called_back_as_custom_tool_calls() -> None:
    patch = {
        "type": "custom",
        "name": "apply_patch",
        "description": "Edits files.",
        "format": {"type": "grammar", "syntax": "lark", "definition": 'start: "*** Begin Patch" /.+/'},
    }
    offer = chat_tools([patch], "auto")
    (tool,) = offer.tools
    assert tool["function"]["parameters"]["required"] == ["input"]
    assert "*** Begin Patch" in tool["function"]["parameters"]["properties"]["input"]["description"]
    call = ToolCall("call_p", "apply_patch", {"input": "*** Begin Patch\n"})
    (item,), events = build([ChatDelta(tool_calls=(call,))], offer)
    assert (item["type"], item["name"], item["input"]) == ("custom_tool_call", "apply_patch", "*** Begin Patch\n")
    kinds = [event["type"] for event in events]
    assert kinds == [
        "response.output_item.added",
        "response.custom_tool_call_input.delta",
        "response.custom_tool_call_input.done",
        "response.output_item.done",
    ]
    history = input_messages(
        [item, {"type": "custom_tool_call_output", "call_id": "call_p", "output": "applied"}], names=offer.chat_name
    )
    assert json.loads(history[0]["tool_calls"][0]["function"]["arguments"]) == {"input": "*** Begin Patch\n"}
    assert history[1] == {"role": "tool", "tool_call_id": "call_p", "name": "apply_patch", "content": "applied"}


def test_flat_names_follow_codex_and_stay_unique_and_short() -> None:
    assert flat_name("multi_agent_v1", "spawn_agent") == "multi_agent_v1__spawn_agent"
    assert flat_name("mcp__server__", "_tool") == "mcp__server__tool"  # underscores at the join trimmed
    long = flat_name("n" * 40, "t" * 40)
    assert len(long) == 64 and long.startswith("n" * 40 + "__") and long != flat_name("n" * 40, "t" * 41)
    # A namespaced tool whose flat name another tool already has gets the digest form.
    clash = chat_tools(
        [
            function_tool("ns__f", "plain"),
            {"type": "namespace", "name": "ns", "description": "d", "tools": [function_tool("f", "inner")]},
        ],
        "auto",
    )
    names = [tool["function"]["name"] for tool in clash.tools]
    assert names[0] == "ns__f" and names[1].startswith("ns__f_") and len(set(names)) == 2
    assert clash.chat_name("f", "ns") == names[1] and clash.chat_name("f") == "f"
    # Namespace tools with the same name (Codex sends one per dynamic tool) merge.
    split = chat_tools([{**AGENTS, "tools": AGENTS["tools"][:1]}, {**AGENTS, "tools": AGENTS["tools"][1:]}], "auto")
    assert [tool["function"]["name"] for tool in split.tools] == CHAT_NAMES[7:]


@pytest.mark.parametrize(
    "tools, field",
    [
        (
            [{**AGENTS, "tools": [{"type": "namespace", "name": "inner", "description": "", "tools": []}]}],
            "tools[0].tools[0].type",
        ),
        ([{**AGENTS, "tools": [{"type": "web_search"}]}], "tools[0].tools[0].type"),
        ([{**AGENTS, "tools": [{**CODEX_FUNCTIONS[0], "name": "bad name"}]}], "tools[0].tools[0].name"),
        ([{**AGENTS, "tools": [CODEX_FUNCTIONS[0], CODEX_FUNCTIONS[0]]}], "tools[0].tools[1].name"),
        ([{**AGENTS, "name": "a.b"}], "tools[0].name"),
        ([{**AGENTS, "tools": {"spawn_agent": {}}}], "tools[0].tools"),
        ([{**AGENTS, "description": 5}], "tools[0].description"),
        ([{"type": "custom", "name": "p", "format": {"type": "grammar", "syntax": "lark"}}], "tools[0].format"),
        ([{"type": "web search"}], "tools[0].type"),
        ([CODEX_FUNCTIONS[0], 5], "tools[1].type"),
    ],
    ids=lambda value: value if isinstance(value, str) else None,
)
def test_malformed_tools_are_typed_errors_naming_the_field(tools: list, field: str) -> None:
    with pytest.raises(InvalidRequestError) as info:
        chat_tools(tools, "auto")
    assert info.value.field == field


@pytest.mark.parametrize(
    "choice, forced",
    [
        ({"type": "function", "name": "spawn_agent"}, f"{NAMESPACE}__spawn_agent"),
        ({"type": "function", "name": "spawn_agent", "namespace": NAMESPACE}, f"{NAMESPACE}__spawn_agent"),
        ({"type": "function", "name": f"{NAMESPACE}__wait_agent"}, f"{NAMESPACE}__wait_agent"),
        ({"type": "function", "name": "exec_command"}, "exec_command"),
    ],
)
def test_a_choice_may_name_a_namespaced_tool(choice: dict, forced: str) -> None:
    offer = chat_tools(codex_body()["tools"], choice)
    assert offer.tool_choice == {"type": "function", "function": {"name": forced}}


def test_allowed_tools_may_name_namespaced_tools() -> None:
    allowed = {
        "type": "allowed_tools",
        "mode": "required",
        "tools": [{"type": "function", "name": "wait_agent"}, {"type": "web_search"}],
    }
    offer = chat_tools(codex_body()["tools"], allowed)
    assert [tool["function"]["name"] for tool in offer.tools] == [f"{NAMESPACE}__wait_agent"]
    assert offer.tool_choice == "required"


@pytest.mark.parametrize("choice", [{"type": "web_search"}, {"type": "file_search"}, {"type": "mcp"}])
def test_a_choice_naming_a_built_in_tool_is_refused(choice: dict) -> None:
    with pytest.raises(InvalidRequestError) as info:
        chat_tools(codex_body()["tools"], choice)
    assert info.value.field == "tool_choice"
    assert ("left out" in str(info.value)) is (choice["type"] == "web_search")


@pytest.mark.parametrize(
    "items, field",
    [
        (
            [
                {"type": "function_call", "call_id": "c", "name": "f", "arguments": "{}"},
                {
                    "type": "function_call_output",
                    "call_id": "c",
                    "output": [{"type": "input_text", "text": "see"}, {"type": "input_image", "image_url": "data:,"}],
                },
            ],
            "input[1].output[1].type",
        ),
        (
            [{"type": "function_call", "call_id": "c", "name": "f", "namespace": "a b", "arguments": "{}"}],
            "input[0].namespace",
        ),
        ([{"type": "custom_tool_call", "call_id": "c", "name": "p", "input": {"patch": 1}}], "input[0].input"),
        ([{"type": "custom_tool_call_output", "call_id": "unknown", "output": "x"}], "input[0].call_id"),
        ([{"type": "web_search_call", "id": "ws_1", "status": "completed"}], "input[0].type"),
    ],
)
def test_what_history_cannot_hold_is_refused_naming_the_field(items: list, field: str) -> None:
    with pytest.raises(InvalidRequestError) as info:
        input_messages(items)
    assert info.value.field == field


def test_a_stream_pulses_while_no_delta_comes_and_loses_none() -> None:
    """Codex drops a stream after 300 s without an event: a long wait is filled with pulses."""

    async def slow() -> AsyncIterator[ChatDelta]:
        yield ChatDelta("a")
        await asyncio.sleep(1.0)
        yield ChatDelta("b")

    async def collect() -> list[str | None]:
        return [delta and delta.content async for delta in pulsed(slow(), 0.1)]

    seen = asyncio.run(collect())
    assert [text for text in seen if text is not None] == ["a", "b"]
    assert seen[0] == "a" and seen[-1] == "b" and 2 <= seen.count(None) <= 10


def test_a_consumer_that_stops_while_waiting_ends_the_source() -> None:
    ended: list[bool] = []

    async def endless() -> AsyncIterator[ChatDelta]:
        try:
            yield ChatDelta("a")
            await asyncio.sleep(3600)
        finally:
            ended.append(True)

    async def stop_early() -> None:
        deltas = pulsed(endless(), 0.05)
        assert (await anext(deltas)).content == "a"
        assert await anext(deltas) is None
        await deltas.aclose()
        for _ in range(10):  # the cancelled wait reaches the source
            await asyncio.sleep(0)

    asyncio.run(stop_early())
    assert ended == [True]


# -- the property test: any tool list gives a typed error or valid chat tools ----------------------

special_names = ["f", "exec_command", "spawn_agent", "ns__f", "_", "x" * 64, "bad name", "", 5, "y" * 300]
names = st.one_of(st.sampled_from(special_names), *[st.from_regex(r"[a-z_]{1,12}", fullmatch=True)] * 3)
texts = st.one_of(st.none(), *[st.text(max_size=20)] * 6, st.builds(lambda: "d" * 100_000), st.just(5))
schemas = st.none() | st.just({"type": "object", "properties": {"a": {"type": "string"}}}) | st.just("not a schema")
built_ins = st.sampled_from(
    [
        "web_search",
        "web_search_preview",
        "file_search",
        "image_generation",
        "code_interpreter",
        "computer_use_preview",
        "local_shell",
        "mcp",
        "tool_search",
        "shell",
        "made_up_tool",
    ]
)
functions = st.fixed_dictionaries(
    {"type": st.just("function"), "name": names},
    optional={"description": texts, "parameters": schemas, "strict": st.booleans()},
)
customs = st.fixed_dictionaries(
    {"type": st.just("custom"), "name": names},
    optional={
        "description": texts,
        "format": st.sampled_from(
            [
                None,
                {"type": "text"},
                *[{"type": "grammar", "syntax": "lark", "definition": "s"}] * 3,
                {"type": "grammar"},
            ]
        ),
    },
)
malformed = st.sampled_from([{"type": 7}, "tool", {"name": "untyped"}, {"type": "web search"}])
built_in_tools = st.fixed_dictionaries({"type": built_ins})
leaves = st.one_of(*[functions] * 6, customs, customs, built_in_tools, built_in_tools, malformed)


def namespaces(inner: st.SearchStrategy) -> st.SearchStrategy:
    """Namespaces of function and custom tools, now and then of anything (which nests them)."""
    members = st.lists(st.one_of(*[functions] * 4, customs, inner), max_size=4)
    return st.fixed_dictionaries(
        {"type": st.just("namespace"), "name": names | st.just("multi_agent_v1"), "tools": members},
        optional={"description": texts},
    )


flat_namespaces = namespaces(st.nothing())
usual = st.one_of(*[functions] * 4, customs, built_in_tools, flat_namespaces, flat_namespaces)
odd = malformed | st.recursive(leaves, namespaces, max_leaves=6)  # namespaces in namespaces, deep at times
tool_lists = st.lists(st.one_of(*[usual] * 8, odd), max_size=8)
choices = (
    st.none()
    | st.sampled_from(["auto", "none", "required", "sometimes"])
    | st.fixed_dictionaries(
        {"type": st.sampled_from(["function", "custom", "web_search", "allowed_tools"]), "name": names},
        optional={
            "namespace": names,
            "mode": st.sampled_from(["auto", "required"]),
            "tools": st.lists(st.fixed_dictionaries({"type": st.just("function"), "name": names}), max_size=3),
        },
    )
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(tool_lists, choices)
def test_any_tools_give_a_typed_error_or_valid_chat_tools(tools: list, choice: Any) -> None:
    try:
        offer = chat_tools(tools, choice)
    except InvalidRequestError as exc:
        assert exc.field and exc.field.startswith(("tools[", "tool_choice")), exc.field
        return
    assert all(isinstance(kind, str) and kind not in ("function", "custom", "namespace") for kind in offer.omitted)
    assert len(set(offer.omitted)) == len(offer.omitted)
    try:
        if offer.tools:
            validate_tools(offer.tools)
    except InvalidRequestError as exc:
        assert exc.field == "tools"  # a name or schema the chat runtime refuses, as it would for chat completions
        return
    chat_names = [tool["function"]["name"] for tool in offer.tools or ()]
    filtered = isinstance(choice, dict) and choice.get("type") == "allowed_tools"
    assert set(chat_names) <= set(offer.targets) and (filtered or set(offer.targets) == set(chat_names))
    for chat_name, target in offer.targets.items():
        assert offer.chat_name(target.name, target.namespace) == chat_name  # a call maps back and forth


good_names = st.from_regex(r"[a-z_]{1,12}", fullmatch=True) | st.sampled_from(["n" * 64, "ns__f", "f", "ns"])
good_functions = st.fixed_dictionaries({"type": st.just("function"), "name": good_names, "description": st.text()})
good_customs = st.fixed_dictionaries({"type": st.just("custom"), "name": good_names})
good_namespaces = st.fixed_dictionaries(
    {
        "type": st.just("namespace"),
        "name": good_names,
        "description": st.text(max_size=10),
        "tools": st.lists(good_functions | good_customs, max_size=4),
    }
)
well_formed = st.one_of(good_functions, good_customs, good_namespaces, st.fixed_dictionaries({"type": built_ins}))


@settings(max_examples=200, deadline=None)
@given(st.lists(well_formed, max_size=8))
def test_well_formed_tools_are_all_offered_under_names_that_map_back(tools: list) -> None:
    plain = [tool["name"] for tool in tools if tool["type"] in ("function", "custom")]
    members = [(tool["name"], member) for tool in tools if tool["type"] == "namespace" for member in tool["tools"]]
    pairs = [(namespace, member["name"]) for namespace, member in members]
    if len(set(pairs)) < len(pairs):  # a namespace with two tools of one name
        with pytest.raises(InvalidRequestError, match="already has a tool"):
            chat_tools(tools, "auto")
        return
    offer = chat_tools(tools, "auto")
    left_out = [tool["type"] for tool in tools if tool["type"] not in ("function", "custom", "namespace")]
    assert offer.omitted == tuple(dict.fromkeys(left_out))
    assert len(offer.tools or ()) == len(plain) + len(members)
    if len(set(plain)) == len(plain):
        validate_tools(offer.tools or [{"type": "function", "function": {"name": "unused"}}])  # unique, <= 64
    for namespace, member in members:
        chat_name = offer.chat_name(member["name"], namespace)
        assert chat_name not in plain and len(chat_name) <= 64
        assert offer.targets[chat_name] == CallTarget(member["name"], namespace, member["type"])


def test_a_deeply_nested_namespace_is_refused_at_its_first_nesting() -> None:
    deep: dict[str, Any] = {"type": "function", "name": "f"}
    for level in range(100_000):
        deep = {"type": "namespace", "name": f"n{level % 10}", "description": "", "tools": [deep]}
    with pytest.raises(InvalidRequestError) as info:
        chat_tools([deep], "auto")
    assert info.value.field == "tools[0].tools[0].type"


# -- a real server and the official client --------------------------------------------------------


@pytest.fixture(scope="module")
def server(qwen_engine: Engine) -> Iterator[RunningServer]:
    with RunningServer(create_app(qwen_engine, ServerSettings(model_name=MODEL, max_tokens_limit=256))) as running:
        yield running


@pytest.fixture
def client(server: RunningServer, qwen_engine: Engine) -> Iterator[OpenAI]:
    yield server.client()
    assert_idle(qwen_engine)


def create(client: OpenAI, body: dict[str, Any], **options: Any) -> Any:
    """`body` through the official client, the fields its signature lacks as extra body."""
    fields = {**body, "temperature": 0, **options}
    extra = {key: fields.pop(key) for key in ("client_metadata",) if key in fields}
    return client.responses.with_raw_response.create(**fields, extra_body=extra)


def test_codex_turns_a_forced_namespaced_call_then_its_output(client: OpenAI) -> None:
    forced = {"type": "function", "name": "wait_agent"}
    raw = create(client, codex_body(tool_choice=forced), max_output_tokens=96)
    assert raw.http_response.status_code == 200 and raw.headers[OMITTED_TOOLS_HEADER] == "web_search"
    events = list(raw.parse())
    kinds = [event.type for event in events]
    assert kinds[:2] == ["response.created", "response.in_progress"] and kinds[-1] == "response.completed"
    done = [event.item for event in events if event.type == "response.output_item.done"]
    assert [(item.type, item.name, item.namespace) for item in done] == [("function_call", "wait_agent", NAMESPACE)]
    call = done[0]
    assert isinstance(json.loads(call.arguments)["id"], str) and call.id and call.call_id
    first = events[-1].response
    assert first.output == done and first.model_extra["kvchat_omitted_tools"] == ["web_search"]
    assert first.usage.input_tokens_details.cached_tokens >= 0 and first.usage.total_tokens > 0

    # The next turn sends the whole history back (store is false), with a reasoning item,
    # the call as Codex keeps it and its output as content parts.
    history = [
        *CODEX_INPUT,
        {"type": "reasoning", "id": "rs_1", "summary": [], "encrypted_content": None},
        {
            "type": "function_call",
            "call_id": call.call_id,
            "name": call.name,
            "namespace": call.namespace,
            "arguments": call.arguments,
        },
        {
            "type": "function_call_output",
            "call_id": call.call_id,
            "output": [{"type": "input_text", "text": "Agent 7 finished; it found README.md."}],
        },
    ]
    second = create(client, codex_body(input=history, stream=False), max_output_tokens=2)
    assert second.headers[OMITTED_TOOLS_HEADER] == "web_search"
    answer = second.parse()
    assert answer.status in ("completed", "incomplete") and answer.store is False
    assert answer.usage.input_tokens_details.cached_tokens >= first.usage.input_tokens
    assert answer.model_extra["kvchat_omitted_tools"] == ["web_search"]


def test_without_built_in_tools_there_is_no_header(server: RunningServer, client: OpenAI) -> None:
    # The tools offered are those of the test above (web_search was left out): its prompt is cached.
    body = codex_body(tools=[*CODEX_FUNCTIONS, AGENTS], stream=False, max_output_tokens=1)
    response = httpx.post(f"{server.url}/v1/responses", json=body, timeout=60)
    assert response.status_code == 200, response.text
    assert OMITTED_TOOLS_HEADER not in response.headers and response.json()["kvchat_omitted_tools"] == []

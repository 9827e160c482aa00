"""`kvchat.chat.tool_round.closing_messages`: when the reply after a tool round can be
closed by a system note, on small templates (no model)."""

from __future__ import annotations

from kvchat.chat.template import ChatTemplate
from kvchat.chat.tool_round import CLOSING_NOTE, closing_messages

TOOLS = [{"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}]
ROUND = [
    {"role": "user", "content": "What is 17 plus 25?"},
    {"role": "assistant", "content": "", "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "add", "arguments": '{"a": 17, "b": 25}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "42"},
]
EACH_IN_PLACE = ("{% for m in messages %}<|{{ m.role }}|>{{ m.content }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def test_a_round_that_ends_with_a_tool_result_is_closed_by_the_note() -> None:
    closed = closing_messages(ChatTemplate(EACH_IN_PLACE), ROUND, TOOLS)
    assert closed == [*ROUND, {"role": "system", "content": CLOSING_NOTE}]


def test_a_conversation_that_does_not_end_with_a_tool_result_is_not_closed() -> None:
    template = ChatTemplate(EACH_IN_PLACE)
    assert closing_messages(template, [*ROUND, {"role": "user", "content": "And 5 plus 5?"}], TOOLS) is None
    assert closing_messages(template, [], TOOLS) is None
    assert closing_messages(template, [*ROUND[:2], "not a message"], TOOLS) is None  # left for the renderer to refuse


def test_a_template_that_refuses_a_later_system_message_gets_no_note() -> None:
    refusing = ("{% for m in messages %}{% if m.role == 'system' and not loop.first %}"
                "{{ raise_exception('System role only first') }}{% endif %}{{ m.content }}{% endfor %}")
    assert closing_messages(ChatTemplate(refusing), ROUND, TOOLS) is None


def test_a_template_that_drops_or_moves_a_later_system_message_gets_no_note() -> None:
    dropping = "{% for m in messages %}{% if m.role != 'system' or loop.first %}{{ m.content }}\n{% endif %}{% endfor %}"
    moving = ("{% for m in messages if m.role == 'system' %}{{ m.content }}\n{% endfor %}"
              "{% for m in messages if m.role != 'system' %}{{ m.content }}\n{% endfor %}")
    assert closing_messages(ChatTemplate(dropping), ROUND, TOOLS) is None
    assert closing_messages(ChatTemplate(moving), ROUND, TOOLS) is None

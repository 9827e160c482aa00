"""The chat layer: messages to tokens and model output back to messages.

- :func:`complete`: the one entry point (templates, tools, JSON output, overflow);
- :class:`ChatRuntime`: chat on one engine, holding its chat tokenizer and
  generated-token memory (share one; :meth:`ChatRuntime.shared` is the engine's);
- :class:`ChatPlan` and :func:`plan_chat`: what a request asks of the model,
  worked out from the template and the request alone;
- :class:`ChatTemplate`: the model's own Jinja template, sandboxed;
- :class:`ChatTokenizer`: injection-safe, token-faithful prompt tokens;
- :class:`GeneratedTokenMemory`: the exact ids of recent assistant replies;
- :class:`ChatSession`: a message-level chat with edit, delete, regenerate, undo;
- :class:`ToolCall` and the tool-call formats.
"""

from kvchat.chat.complete import chat_tokenizer, complete
from kvchat.chat.history import GeneratedTokenMemory
from kvchat.chat.plan import ChatPlan, plan_chat
from kvchat.chat.runtime import ChatRuntime
from kvchat.chat.session import ChatSession, SessionReply
from kvchat.chat.stream import ChatCompletion, ChatDelta, ChatStream
from kvchat.chat.template import CHATML_TEMPLATE, ChatTemplate, TemplateRenderError
from kvchat.chat.tokenizer import ChatTokenizer
from kvchat.chat.tool_calls import ToolCall

__all__ = [
    "CHATML_TEMPLATE",
    "ChatCompletion",
    "ChatDelta",
    "ChatPlan",
    "ChatRuntime",
    "ChatSession",
    "ChatStream",
    "ChatTemplate",
    "ChatTokenizer",
    "GeneratedTokenMemory",
    "SessionReply",
    "TemplateRenderError",
    "ToolCall",
    "chat_tokenizer",
    "complete",
    "plan_chat",
]

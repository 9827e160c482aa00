"""The chat layer: messages to tokens and model output back to messages.

- :func:`complete`: the one entry point (templates, tools, JSON output, overflow);
- :class:`ChatTemplate`: the model's own Jinja template, sandboxed;
- :class:`ChatTokenizer`: injection-safe, token-faithful prompt tokens;
- :class:`GeneratedTokenMemory`: the exact ids of recent assistant replies;
- :class:`ChatSession`: a message-level chat with edit, delete, regenerate, undo;
- :class:`ToolCall` and the tool-call formats.
"""

from kvchat.chat.complete import ChatCompletion, ChatDelta, ChatStream, chat_tokenizer, complete
from kvchat.chat.history import GeneratedTokenMemory
from kvchat.chat.session import ChatSession, SessionReply
from kvchat.chat.template import CHATML_TEMPLATE, ChatTemplate, TemplateRenderError
from kvchat.chat.tokenizer import ChatTokenizer
from kvchat.chat.tool_calls import ToolCall

__all__ = [
    "CHATML_TEMPLATE",
    "ChatCompletion",
    "ChatDelta",
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
]

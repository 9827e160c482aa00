"""The chat layer: model chat templates (more of it lands with the chat-layer issue)."""

from kvchat.chat.template import CHATML_TEMPLATE, ChatTemplate, TemplateRenderError

__all__ = ["CHATML_TEMPLATE", "ChatTemplate", "TemplateRenderError"]

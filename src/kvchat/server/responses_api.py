"""The request of OpenAI's Responses API (``POST /v1/responses``) and its translation
to what :meth:`kvchat.chat.ChatRuntime.complete` takes, and to what the response
echoes of it (:func:`response_frame`): the public face of three modules, whose
names it re-exports.

- :mod:`kvchat.server.responses_request`: the request's model
  (:class:`ResponsesRequest`), the validators and limits of what the response
  echoes, what is refused (:func:`check_supported`), `text.format` as
  `response_format` (:func:`response_format`), and the echo (:func:`response_frame`).
- :mod:`kvchat.server.responses_input`: `input` (a string, or a list of items)
  becomes chat messages (:func:`input_messages`).
- :mod:`kvchat.server.responses_tools`: `tools` become chat tools, `tool_choice`
  chat's choice (:func:`chat_tools`, which also says how the model's calls map
  back: :class:`ToolOffer`), including namespaced, custom and built-in tools.

What OpenAI's Codex CLI sends (``wire_api = "responses"``; codex-rs/codex-api,
``ResponsesApiRequest``) is taken as it is: ``stream``, ``store: false``,
``instructions``, ``input`` (``developer`` and ``user`` messages of ``input_text``
parts; later the history with ``reasoning``, ``function_call``,
``function_call_output`` and assistant ``message`` items), ``tools``,
``tool_choice: "auto"``, ``parallel_tool_calls``, ``reasoning``, ``include:
["reasoning.encrypted_content"]``, ``prompt_cache_key``, ``client_metadata``, and
``text`` (``verbosity``, and a ``format`` for ``--output-schema``). How each is
served:

- **Namespaced tools**, **custom (freeform) tools** and **built-in tools** the
  server cannot run: see :mod:`kvchat.server.responses_tools`.
- ``reasoning`` (``effort``, ``summary``) and ``include:
  ["reasoning.encrypted_content"]`` are accepted for models that do not reason:
  no reasoning item is made (Codex needs none), and ``reasoning`` items sent back
  are dropped.
- ``prompt_cache_key`` is accepted and does nothing: the engine's prefix cache
  already finds a conversation's prefix by its tokens, within the tenant's cache
  namespace (the API key's ``cache_key``), which the key never widens nor
  narrows (narrowing it per session would stop Codex sessions sharing their long
  instructions and tools). On Ray Serve the router's prefix affinity keeps a
  session's turns on one replica the same way, since each turn's text continues
  the last. ``client_metadata`` is accepted and ignored.
- ``parallel_tool_calls: true`` keeps every call the model makes in one reply
  (Qwen's template writes one ``<tool_call>`` block per call); ``false`` keeps the
  first.

Where OpenAI's API and kvchat differ (a ``developer`` message is a ``system``
message, content parts are joined): :mod:`kvchat.server.responses_input`. What is
refused with a 400, and the bounds on what the response echoes:
:mod:`kvchat.server.responses_request`.
"""

from __future__ import annotations

from kvchat.server.responses_input import ChatName, input_messages, known_calls
from kvchat.server.responses_request import (
    MAX_INSTRUCTIONS,
    MAX_JSON_DEPTH,
    MAX_JSON_SIZE,
    MAX_METADATA_KEY,
    MAX_METADATA_PAIRS,
    MAX_METADATA_VALUE,
    MAX_RESPONSE_ID,
    MAX_USER,
    ResponsesRequest,
    check_supported,
    json_problem,
    response_format,
    response_frame,
)
from kvchat.server.responses_tools import ToolOffer, chat_tools, flat_name

__all__ = [
    "MAX_INSTRUCTIONS",
    "MAX_JSON_DEPTH",
    "MAX_JSON_SIZE",
    "MAX_METADATA_KEY",
    "MAX_METADATA_PAIRS",
    "MAX_METADATA_VALUE",
    "MAX_RESPONSE_ID",
    "MAX_USER",
    "ChatName",
    "ResponsesRequest",
    "ToolOffer",
    "chat_tools",
    "check_supported",
    "flat_name",
    "input_messages",
    "json_problem",
    "known_calls",
    "response_format",
    "response_frame",
]
